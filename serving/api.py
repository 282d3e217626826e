"""The HTTP ingress: an OpenAI-compatible chat API, /health, and the Gradio page at /ui."""


import hmac
import json
import math
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

# Request limits (named so the errors can quote them).
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 512
MAX_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_REQUEST_BYTES = 2 * 2**20  # a request body; far above the longest prompt any ChatGLM context holds

api = FastAPI(title="glmops chat", docs_url=None, redoc_url=None)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


def overloaded(message: str, retry_after: float) -> APIError:
    return APIError(429, message, None, "rate_limit_error", {"Retry-After": str(max(1, math.ceil(retry_after)))})


# Characters that JSON leaves raw but that line splitters (Python's str.splitlines, httpx's aiter_lines,
# some JavaScript) take for line breaks: escaped, so one event's data line is never cut in two.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse_json(body: dict) -> str:
    """One server-sent event's JSON: UTF-8 text as it is, on exactly one line."""
    return json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKS)


def _too_large() -> JSONResponse:
    return error_response(413, f"the request body is over this server's limit of {MAX_REQUEST_BYTES:,} bytes "
                          "(MAX_REQUEST_BYTES)", None)


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
            return _too_large()
    elif request.method == "POST":  # chunked: count while reading, never hold more than the limit
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return _too_large()
        request._body = bytes(body)  # what the handler reads
    return await call_next(request)


class ClientLeftIsADisconnect:
    """ASGI middleware: a client that hung up is an `http.disconnect` message, never an error.

    Ray Serve's replica reads a request's messages from the proxy in the background. When the client leaves
    while that read is in flight, the read can fail with Ray's TaskCancelledError, which Ray then raises from
    the app's next `receive()`. A streaming response waits in `receive()` for exactly that disconnect, so
    the error escaped through its task group and Ray logged the finished, cancelled request as failed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


api.add_middleware(ClientLeftIsADisconnect)  # outermost: the body limit and the routes see the disconnect


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError):
    return error_response(err.status, err.message, err.param, err.kind, err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException):
    # FastAPI answers a body it cannot decode (not UTF-8, say) with a bare HTTPException: give it our shape.
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    message = "the request body is not valid UTF-8 JSON" if err.status_code == 400 else str(err.detail)
    return error_response(err.status_code, message, None, kind, getattr(err, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError):
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", None)
    return error_response(400, f"{loc or 'body'}: {first.get('msg')}", loc or None)


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = Field(default=None)
    temperature: float = 0.95
    top_p: float = 0.7
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    n: int = 1  # only one choice per request
    seed: int | None = None  # the same seed and request give the same sampled reply
    min_tokens: int = 0  # extension (as in vLLM): generate at least this many tokens


def to_conversation(messages: list[Message]) -> dict:
    """OpenAI messages → {system, history [(q, a)], query}; roles must alternate user/assistant, ending with user."""
    if not messages:
        raise APIError(400, "messages: at least one message is required", "messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages: at most {MAX_MESSAGES} messages", "messages")
    system: list[str] = []
    i = 0
    while i < len(messages) and messages[i].role == "system":
        system.append(messages[i].text())
        i += 1
    turns = messages[i:]
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m.role != expected:
            raise APIError(400, f"messages[{i + j}].role: expected '{expected}' (after optional system messages, "
                                f"user and assistant alternate), found '{m.role}'", f"messages[{i + j}].role")
    if not turns or turns[-1].role != "user":
        raise APIError(400, "messages: the last message must come from the user", "messages")
    texts = [m.text() for m in turns]
    for k, text in enumerate([m.text() for m in messages[:i]] + texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"messages[{k}].content: not valid Unicode text (a lone surrogate at character "
                                f"{err.start})", f"messages[{k}].content") from None
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return {"system": "\n".join(system) or None, "history": history, "query": texts[-1]}


def validate_sampling(req: ChatRequest) -> dict:
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens <= 0:
        raise APIError(400, f"max_tokens: must be > 0, found {max_tokens}", "max_tokens")
    if max_tokens > MAX_TOKENS_LIMIT:
        raise APIError(400, f"max_tokens: at most {MAX_TOKENS_LIMIT}, found {max_tokens}", "max_tokens")
    if req.temperature < 0 or req.temperature > 2:
        raise APIError(400, f"temperature: must be in [0, 2], found {req.temperature}", "temperature")
    if not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p: must be in (0, 1], found {req.top_p}", "top_p")
    if req.repetition_penalty <= 0:
        raise APIError(400, f"repetition_penalty: must be > 0, found {req.repetition_penalty}", "repetition_penalty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences", "stop")
    if not 0 <= req.min_tokens <= max_tokens:
        raise APIError(400, f"min_tokens: must be in [0, max_tokens], found {req.min_tokens}", "min_tokens")
    if req.n != 1:
        raise APIError(400, f"n: only 1 choice per request is supported, found {req.n}", "n")
    return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty, "stop": tuple(stop), "min_tokens": req.min_tokens,
            "seed": req.seed}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle, api_key: str | None = None, model_name: str = "glmops",
                 ui: bool = True):
        self.model = model
        self.streams = model.options(stream=True)
        self.api_key = api_key or None
        self.model_name = model_name
        if ui:
            self._mount_ui()

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None,
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict:
        info = await self.model.info.remote()
        keep = ("running", "waiting", "free_slots", "max_num_seqs", "max_model_len", "max_queued_requests",
                "kv_cache_used_tokens", "gpu_memory_allocated_gib", "gpu_memory_reserved_gib")
        return {"status": "ok", "model": info["id"], "active_streams": info["active_streams"],
                **{k: info[k] for k in keep if k in info}}

    @api.get("/metrics")
    async def metrics(self):
        """Prometheus text format: the engine's counters and histograms (of the replica that answers)."""
        return PlainTextResponse(await self.model.metrics.remote(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check_key(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "glmops",
                                            "created": 0}]}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest, request: Request):
        self._check_key(request)
        conv = to_conversation(req.messages)
        sampling = validate_sampling(req)
        gen, first = await self._admitted(conv, sampling)
        n_prompt = first["prompt_tokens"]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not req.stream:
            text, final = "", {}
            async for chunk in gen:
                if "delta" in chunk:
                    text += chunk["delta"]
                elif "finish_reason" in chunk:
                    final = chunk
            usage = {"prompt_tokens": final.get("prompt_tokens", n_prompt),
                     "completion_tokens": final.get("completion_tokens", 0)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": final.get("finish_reason", "stop")}], "usage": usage}

        def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return f"data: {sse_json(body)}\n\n"

        async def sse():
            try:
                yield event({"role": "assistant", "content": ""})
                async for chunk in gen:
                    if "delta" in chunk:
                        yield event({"content": chunk["delta"]})
                    elif "finish_reason" in chunk:
                        usage = {"prompt_tokens": chunk["prompt_tokens"],
                                 "completion_tokens": chunk["completion_tokens"],
                                 "total_tokens": chunk["prompt_tokens"] + chunk["completion_tokens"]}
                        yield event({}, chunk["finish_reason"], usage)
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()  # the client left: stop generating on the replica and free its slot

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def _admitted(self, conv: dict, sampling: dict):
        """Start the stream and wait for the replica's answer: admitted, or why not (before any 200)."""
        from ray.serve.exceptions import BackPressureError

        try:
            gen = self.streams.stream.remote(conv, sampling)
            first = await gen.__anext__()
        except BackPressureError:
            raise overloaded("the server is busy: every replica's queue is full; retry later", 2.0) from None
        if first.get("error") == "overloaded":
            raise overloaded(first["message"], first["retry_after"])
        if first.get("error") == "too_long":
            raise APIError(400, f"messages: {first['message']}", "messages")
        return gen, first

    def _mount_ui(self) -> None:
        import gradio as gr

        from serving.web import build_ui

        gr.mount_gradio_app(api, build_ui(self.streams, self.api_key), path="/ui")
