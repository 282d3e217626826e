"""The HTTP ingress: an OpenAI-compatible chat API, /health, and the Gradio page at /ui."""


import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayError, TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import events

log = logging.getLogger("ray.serve")

# Request limits (named so the errors can quote them).
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 512
MAX_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 64
MAX_REQUEST_BYTES = 2 * 2**20  # a request body; far above the longest prompt any ChatGLM context holds
ADMISSION_TIMEOUT_S = 10.0     # a model replica admits or refuses at once; no answer means none can serve
ADAPTER_FETCH_TIMEOUT_S = 600.0  # a replica downloading a request's adapter (it said so at once)
HEALTH_TIMEOUT_S = 5.0
RETRY_AFTER_S = 5              # suggested to clients while an engine restarts or the model loads

api = FastAPI(title="glmops chat", docs_url=None, redoc_url=None)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = code


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def overloaded(message: str, retry_after: float) -> APIError:
    return APIError(429, message, None, "rate_limit_error", _retry_after(retry_after))


def unavailable(message: str, code: str, retry_after: float = RETRY_AFTER_S) -> APIError:
    return APIError(503, message, None, "server_error", _retry_after(retry_after), code)


def ended_early(chunk: dict) -> APIError:
    """A reply the server ended (engine failure, deadline, shutdown), as a non-streamed answer: 504 for a
    deadline, else 503 with Retry-After."""
    if chunk["error"] == "timeout":
        return APIError(504, chunk["message"], "timeout", "server_error", None, "timeout")
    return unavailable(chunk["message"], chunk["error"])


def not_serving(status: str, reason: str, model: str | None = None) -> JSONResponse:
    """/health while no replica can serve: 503, why (also in OpenAI's error shape), and when to retry."""
    return JSONResponse({"status": status, "model": model, "reason": reason,
                         "error": {"message": reason, "type": "server_error", "param": None, "code": status}},
                        503, headers=_retry_after(RETRY_AFTER_S))


def error_event(code: str, message: str) -> str:
    """OpenAI's streaming error shape: a stream that cannot finish says so before its [DONE]."""
    return f"data: {sse_json({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': code}})}\n\n"


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
    return error_response(err.status, err.message, err.param, err.kind, err.headers, err.code)


def replica_failed(err: RayError) -> str:
    """What a client is told when the model replica died under its request (its process killed, say)."""
    log.warning("a model replica failed under a request: %s", type(err).__name__)
    return f"the model replica failed ({type(err).__name__}); the server is replacing it, retry"


@api.exception_handler(RayError)
async def _ray_error(_: Request, err: RayError):
    return error_response(503, replica_failed(err), None, "server_error", _retry_after(RETRY_AFTER_S),
                          "engine_failed")


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception):
    log.exception("unexpected error in the ingress")  # a bug of ours: still an answer in OpenAI's shape
    return error_response(500, f"internal error ({type(err).__name__}); see the server log", None, "server_error")


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
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None                 # a tool result: the call it answers
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
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
    timeout: float | None = None  # seconds; past it the reply ends with a timeout error (capped by request_timeout_s)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


def to_conversation(messages: list[Message]) -> dict:
    """OpenAI messages → {system, history [(q, a)], query}; roles must alternate user/assistant, ending with user."""
    if not messages:
        raise APIError(400, "messages: at least one message is required", "messages")
    system: list[str] = []
    i = 0
    while i < len(messages) and messages[i].role == "system":
        system.append(messages[i].text())
        i += 1
    turns = messages[i:]
    for k, m in enumerate(messages):
        if m.content is None:
            raise APIError(400, f"messages[{k}].content: required (only an assistant message with tool_calls may "
                                "leave it out)", f"messages[{k}].content")
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


def tool_conversation(req: ChatRequest) -> dict | None:
    """A request with tools, tool calls or tool results: its conversation in common/chat_records.py's terms (the
    same checks as training data), plus `tool_choice`; None for a plain chat request."""
    from common.chat_records import RecordError, messages_conversation
    from common.tools import tool_specs

    uses_tools = req.tools or any(m.role == "tool" or m.tool_calls for m in req.messages)
    if req.tool_choice is not None and not req.tools and req.tool_choice != "none":
        raise APIError(400, "tool_choice: needs tools", "tool_choice")
    if not uses_tools:
        return None
    if len(req.tools or []) > MAX_TOOLS:
        raise APIError(400, f"tools: at most {MAX_TOOLS} tools (MAX_TOOLS)", "tools")
    try:
        specs = tool_specs(req.tools) if req.tools else None
    except ValueError as err:
        field = str(err).partition(":")[0]
        raise APIError(400, str(err), field) from None
    choice = req.tool_choice or "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in {s["name"] for s in specs or []}:
            raise APIError(400, "tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": N}} with N one "
                           f"of the request's tools, found {json.dumps(choice, ensure_ascii=False)[:80]}", "tool_choice")
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice: expected auto, none, required or a named function, found {choice!r}",
                       "tool_choice")
    # Text parts joined; an assistant message that only calls keeps content None.
    messages = [{**m.model_dump(exclude_none=True), "content": None if m.content is None else m.text()}
                for m in req.messages]
    try:
        conv = messages_conversation({"tools": specs, "messages": messages}, prompt=True)
    except RecordError as err:
        raise APIError(400, str(err), err.field) from None
    return {**conv.to_dict(), "tools": specs, "tool_choice": choice}


def openai_tool_call(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else {"index": index, **out}


def argument_fragments(arguments: str, size: int = 16) -> list[str]:
    """A call's arguments as a stream's fragments (OpenAI streams them in pieces)."""
    return [arguments[i:i + size] for i in range(0, len(arguments), size)] or [""]


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
    if req.timeout is not None and not req.timeout > 0:
        raise APIError(400, f"timeout: must be > 0 seconds, found {req.timeout}", "timeout")
    return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty, "stop": tuple(stop), "min_tokens": req.min_tokens,
            "seed": req.seed}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle, api_key: str | None = None, model_name: str = "glmops",
                 ui: bool = True, stalled_client_timeout_s: float = 0, adapter_names: tuple[str, ...] = ()):
        from serving.loopback import bind_replica_server_to_node

        bind_replica_server_to_node()
        self.model = model
        self.streams = model.options(stream=True)
        self.api_key = api_key or None
        self.model_name = model_name
        self.adapter_names = tuple(adapter_names)
        self.app_name = serve.get_replica_context().app_name
        from serving.slow_clients import PROXY_CALLBACK, guarded_here

        if stalled_client_timeout_s and not guarded_here():
            log.warning("this Ray cluster's nodes were started without RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=%s "
                        "and GLMOPS_STALLED_CLIENT_TIMEOUT_S, so clients that stop reading are not cut off "
                        "(README, 'When things fail')", PROXY_CALLBACK)
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
    async def health(self):
        """200 while a model replica serves; 503 with the reason while none can (engine restarting, model
        loading, shutting down)."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RayError):
            return not_serving("unavailable", await self._why_unavailable())
        if info.get("engine_failed"):
            return not_serving("engine_restarting", f"{info['engine_failed']}; Serve is replacing the replica "
                               "(the model loads again)", info["id"])
        if info.get("draining"):
            return not_serving("draining", "the server is shutting down: running replies may finish, new "
                               "requests are refused", info["id"])
        keep = ("running", "waiting", "free_slots", "max_num_seqs", "max_model_len", "max_queued_requests",
                "kv_cache_used_tokens", "gpu_memory_allocated_gib", "gpu_memory_reserved_gib")
        return {"status": "ok", "model": info["id"], "active_streams": info["active_streams"],
                **{k: info[k] for k in keep if k in info}}

    async def _why_unavailable(self) -> str:
        """Why no model replica answered, from Serve's view of the deployment."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), HEALTH_TIMEOUT_S)
            deployment = status.applications[self.app_name].deployments["ChatModel"]
        except Exception as err:  # noqa: BLE001 - the controller itself may be busy or gone
            return f"no model replica answered, and Serve's status could not be read ({type(err).__name__})"
        states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items() if n}
        if states.get("STARTING") or states.get("UPDATING") or states.get("RECOVERING"):
            return f"the model is loading: a replica is starting (replicas: {states})"
        if states.get("STOPPING") and not states.get("RUNNING"):
            return f"the engine failed or the server is shutting down; Serve is replacing the replica ({states})"
        return f"no model replica answered within {HEALTH_TIMEOUT_S:g} s (deployment {deployment.status}: " \
               f"{deployment.message or states})"

    @api.get("/metrics")
    async def metrics(self):
        """Prometheus text format: the engine's counters and histograms (of the replica that answers), then
        the counts that outlive replicas (engine restarts, requests ended by failure, timeout, slow client)."""
        try:
            engine = await asyncio.wait_for(self.model.metrics.remote(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RayError):
            engine = ""  # no replica to ask now: the lasting counts below still answer
        try:
            lasting = events.prometheus_text(await events.counts())
        except RayError:  # the counts' actor is gone: leave them out rather than report zeros
            lasting = ""
        return PlainTextResponse(engine + lasting, media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The base, the configured adapters, and the adapters requests have named since start-up."""
        self._check_key(request)
        try:
            data = await asyncio.wait_for(self.model.models.remote(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RayError):  # no replica to ask now: the base at least
            data = [{"id": self.model_name, "object": "model", "owned_by": "glmops", "created": 0}]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest, request: Request):
        self._check_key(request)
        if len(req.messages) > MAX_MESSAGES:
            raise APIError(400, f"messages: at most {MAX_MESSAGES} messages", "messages")
        conv = tool_conversation(req) or to_conversation(req.messages)
        sampling = validate_sampling(req)
        gen, first = await self._admitted(conv, sampling, req.timeout, req.model)
        model = req.model or self.model_name
        n_prompt = first["prompt_tokens"]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not req.stream:
            text, final, calls = "", {}, []
            try:
                async for chunk in gen:
                    if "delta" in chunk:
                        text += chunk["delta"]
                    elif "tool_call" in chunk:
                        calls.append(openai_tool_call(chunk["tool_call"]))
                    elif "error" in chunk:
                        events.record(f"ended_{chunk['error']}")
                        raise ended_early(chunk)
                    elif "finish_reason" in chunk:
                        final = chunk
            except RayError:
                events.record("ended_engine_failed")
                raise
            usage = {"prompt_tokens": final.get("prompt_tokens", n_prompt),
                     "completion_tokens": final.get("completion_tokens", 0)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            message = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": final.get("finish_reason", "stop")}], "usage": usage}

        def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return f"data: {sse_json(body)}\n\n"

        async def sse():
            # Every stream ends explicitly: with its finish_reason, or with an error event; then [DONE].
            try:
                yield event({"role": "assistant", "content": ""})
                try:
                    calls = 0
                    async for chunk in gen:
                        if "delta" in chunk:
                            yield event({"content": chunk["delta"]})
                        elif "tool_call" in chunk:  # id and name first, then the arguments in fragments
                            head = openai_tool_call({**chunk["tool_call"], "arguments": ""}, calls)
                            yield event({"tool_calls": [head]})
                            for piece in argument_fragments(chunk["tool_call"]["arguments"]):
                                yield event({"tool_calls": [{"index": calls, "function": {"arguments": piece}}]})
                            calls += 1
                        elif "error" in chunk:
                            events.record(f"ended_{chunk['error']}")
                            yield error_event(chunk["error"], chunk["message"])
                            break
                        elif "finish_reason" in chunk:
                            usage = {"prompt_tokens": chunk["prompt_tokens"],
                                     "completion_tokens": chunk["completion_tokens"],
                                     "total_tokens": chunk["prompt_tokens"] + chunk["completion_tokens"]}
                            yield event({}, chunk["finish_reason"], usage)
                except RayError as err:  # the model replica died under this stream
                    events.record("ended_engine_failed")
                    yield error_event("engine_failed", replica_failed(err))
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()  # the client left: stop generating on the replica and free its slot

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def _admitted(self, conv: dict, sampling: dict, timeout: float | None = None, model: str | None = None):
        """Start the stream and wait for the replica's answer: admitted, or why not (before any 200)."""
        from ray.serve.exceptions import BackPressureError

        gen = self.streams.stream.remote(conv, sampling, timeout, model)
        try:
            first = await asyncio.wait_for(gen.__anext__(), ADMISSION_TIMEOUT_S)
            while first.get("pending"):  # the replica fetches the adapter from the registry or a run first
                first = await asyncio.wait_for(gen.__anext__(), ADAPTER_FETCH_TIMEOUT_S)
        except BackPressureError:
            raise overloaded("the server is busy: every replica's queue is full; retry later", 2.0) from None
        except TimeoutError:  # no replica took it: none is running (engine restarting, model loading)
            gen.cancel()
            raise unavailable(await self._why_unavailable(), "unavailable") from None
        except RayError:
            gen.cancel()
            raise
        if first.get("error") == "overloaded":
            raise overloaded(first["message"], first["retry_after"])
        if first.get("error") == "too_long":
            raise APIError(400, f"messages: {first['message']}", "messages")
        if first.get("error") == "model_not_found":
            raise APIError(404, first["message"], "model", code="model_not_found")
        if first.get("error") == "bad_adapter":
            raise APIError(400, first["message"], "model", code="bad_adapter")
        if first.get("error") == "bad_request":
            raise APIError(400, first["message"], first.get("param"))
        if first.get("error"):  # engine_failed, unavailable: Serve is replacing or draining this replica
            raise unavailable(first["message"], first["error"])
        return gen, first

    def _mount_ui(self) -> None:
        import gradio as gr

        from serving.web import build_ui

        gr.mount_gradio_app(api, build_ui(self.streams, self.api_key, [self.model_name, *self.adapter_names]),
                            path="/ui")
