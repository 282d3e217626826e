"""The HTTP ingress: an OpenAI-compatible chat API, /health, and the Gradio page at /ui."""


import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

# Request limits (named so the errors can quote them).
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 512
MAX_MESSAGES = 256
MAX_STOP_SEQUENCES = 4

api = FastAPI(title="glmops chat", docs_url=None, redoc_url=None)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError):
    return error_response(err.status, err.message, err.param, err.kind)


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
    return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty, "stop": tuple(stop), "min_tokens": req.min_tokens}


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
        if auth != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None,
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict:
        info = await self.model.info.remote()
        return {"status": "ok", "model": info["id"], "active_streams": info["active_streams"]}

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
        info = await self.model.info.remote()
        n_prompt = await self.model.count_prompt.remote(conv)
        if n_prompt + sampling["max_tokens"] > info["max_context"]:
            raise APIError(400, f"messages: the prompt is {n_prompt} tokens; with max_tokens "
                                f"{sampling['max_tokens']} that exceeds the model's context of {info['max_context']}",
                           "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        gen = self.streams.stream.remote(conv, sampling)
        if not req.stream:
            text, final = "", {}
            async for chunk in gen:
                if "delta" in chunk:
                    text += chunk["delta"]
                else:
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
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            try:
                yield event({"role": "assistant", "content": ""})
                async for chunk in gen:
                    if "delta" in chunk:
                        yield event({"content": chunk["delta"]})
                    else:
                        usage = {"prompt_tokens": chunk["prompt_tokens"],
                                 "completion_tokens": chunk["completion_tokens"],
                                 "total_tokens": chunk["prompt_tokens"] + chunk["completion_tokens"]}
                        yield event({}, chunk["finish_reason"], usage)
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()  # the client left: stop generating on the replica and free its slot

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _mount_ui(self) -> None:
        import gradio as gr

        from serving.web import build_ui

        gr.mount_gradio_app(api, build_ui(self.streams, self.api_key), path="/ui")
