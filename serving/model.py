"""The chat model deployment: one model and one engine per replica, every stream batched through it.

`engine="batch"` (the default) runs every request through `serving.engine.Engine` (continuous batching,
one GPU loop, KV cache allocated once, CUDA graphs on GPU). `engine="per_request"` keeps the old path,
one `generate` thread per request, for the serving benchmark's baseline.

`stream()` speaks a small protocol to the ingress: first {"accepted": True} or {"error": ..., ...}
(so the ingress can answer 429/400 before it sends any 200), then {"delta": text}..., then
{"finish_reason", "completion_tokens", "prompt_tokens"}.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from ray import serve

from common.data import Conversation

log = logging.getLogger("ray.serve")

class ChatModel:
    def __init__(self, model: str, bits: int = 16, dtype: str = "auto", device: str = "auto",
                 template: str | None = None, trust_remote_code: bool = False, tracking_uri: str | None = None,
                 engine: str = "batch", max_num_seqs: int | None = None, max_model_len: int | None = None,
                 max_queued_requests: int = 256, prefill_chunk: int | None = None, stream_interval: float = 0.04,
                 engine_process: bool | None = None):
        import torch

        from common.models.loader import detect, load_tokenizer, open_model_folder
        from common.registry import local_model_folder
        from common.templates import get_template
        from serving.engine_process import EngineProcess, EngineSpec, build_engine, load, model_context

        if engine not in ("batch", "per_request"):
            raise ValueError(f"engine must be 'batch' or 'per_request', not {engine!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = local_model_folder(model, tracking_uri)
        info = detect(folder, model) if folder.is_dir() else open_model_folder(model)
        spec = EngineSpec(str(info.path), bits, dtype, device, trust_remote_code, max_num_seqs, max_model_len,
                          max_queued_requests, prefill_chunk, int(os.environ.get("GLMOPS_SERVE_THREADS", "2")))
        self.tok = load_tokenizer(info, trust_remote_code)
        self.template = get_template(template or info.template)
        self.stop_ids = self.template.stop_token_ids(self.tok)
        self.name = model
        self.active_streams = 0
        self.stream_interval = stream_interval
        self.engine = self.model = None
        # On a GPU the engine gets a process of its own (serving/engine_process.py says why).
        in_child = engine == "batch" and (engine_process if engine_process is not None else device == "cuda")
        if in_child:
            self.engine = EngineProcess(spec)
            line, self.max_model_len = self.engine.info["line"], self.engine.max_model_len
            self.model_context = self.engine.info["context"]
        else:
            if device == "cpu":
                torch.set_num_threads(max(1, spec.threads))
            self.model = load(spec)
            self.model_context = self.max_model_len = model_context(self.model)
            line = ""
            if engine == "batch":
                # The engine thread shares this process with Serve's asyncio loop; a short GIL switch interval
                # bounds how long a decode step waits for the interpreter after its GPU sync.
                sys.setswitchinterval(0.0005)
                self.engine, line = build_engine(self.model, spec)
                self.max_model_len = self.engine.config.max_model_len
        if line:
            print(line + (" (engine process)" if in_child else ""), flush=True)
        if int(bits) == 8 and device != "cpu":
            print("warning: bits=8 (bitsandbytes LLM.int8) decodes about 25x slower than bits=4 on a GPU "
                  "(7 tok/s per stream on an H200, bench/NOTES.md); serve with bits=4 or 16", flush=True)
        log.info("serving %s (%s, template %s, %s-bit, %s, engine %s)", model, info.family, self.template.name,
                 bits, device, engine)

    async def _engine_state(self) -> dict:
        from serving.engine_process import EngineProcess

        if isinstance(self.engine, EngineProcess):
            return await self.engine.query()
        return {"stats": self.engine.stats(), "metrics": self.engine.metrics.text()}  # gpu: this process's

    async def info(self) -> dict[str, Any]:
        from serving.engine_process import gpu_memory

        state = await self._engine_state() if self.engine else {}
        stats = state.get("stats") or {"running": self.active_streams, "waiting": 0}
        return {"id": self.name, "template": self.template.name, "max_context": self.max_model_len,
                "active_streams": stats["running"], **stats, **(state.get("gpu") or gpu_memory())}

    async def metrics(self) -> str:
        return (await self._engine_state())["metrics"] if self.engine else ""

    def _prompt(self, conv: dict) -> list[int]:
        return self.template.prompt(self.tok, Conversation.from_dict(conv))

    async def stream(self, conv: dict, sampling: dict):
        from serving.sampling import SamplingParams

        ids = self._prompt(conv)
        params = SamplingParams(**sampling)
        if self.engine is None:
            async for chunk in self._stream_per_request(ids, params):
                yield chunk
            return
        from serving.engine import Overloaded, TooLong
        from serving.streaming import Detokenizer

        try:
            req = self.engine.submit(ids, params, self.stop_ids)
        except Overloaded as err:
            yield {"error": "overloaded", "message": str(err), "retry_after": err.retry_after}
            return
        except TooLong as err:
            yield {"error": "too_long", "message": str(err)}
            return
        yield {"accepted": True, "prompt_tokens": len(ids)}
        detok = Detokenizer(self.tok, params.stop, self.template.clean_reply)
        finish, n = "length", 0
        ended = False
        try:
            while not ended:
                # Everything the engine produced since the last chunk goes out as one: at most one chunk per
                # `stream_interval` per stream keeps Serve's per-chunk cost off the token rate.
                items = [await req.queue.get()]
                while not req.queue.empty():
                    items.append(req.queue.get_nowait())
                tokens = [t for t in items if not isinstance(t, dict)]
                if len(tokens) < len(items):
                    finish, ended = items[len(tokens)]["finish_reason"], True
                n += len(tokens)
                text = detok.add(*tokens) if tokens else ""  # one decode for the whole chunk
                if detok.stopped:
                    finish, ended = "stop", True
                if text:
                    yield {"delta": text}
                    if self.stream_interval and not ended:
                        # Tokens of the next interval go out as one chunk; the end cuts the wait short.
                        try:
                            await asyncio.wait_for(req.queue.ended.wait(), self.stream_interval)
                        except TimeoutError:
                            pass
            if finish == "error":
                raise RuntimeError("generation failed on this replica (see its log)")
            yield {"finish_reason": finish, "completion_tokens": n, "prompt_tokens": len(ids)}
        finally:
            self.engine.abort(req)  # the client went away or a stop string ended it: free the slot now

    async def _stream_per_request(self, ids: list[int], params):
        from serving.streaming import stream_reply

        if len(ids) + params.max_tokens > self.model_context:
            yield {"error": "too_long", "message": f"the prompt is {len(ids)} tokens; with max_tokens "
                   f"{params.max_tokens} that exceeds the model's context of {self.model_context}"}
            return
        yield {"accepted": True, "prompt_tokens": len(ids)}
        self.active_streams += 1
        try:
            async for chunk in stream_reply(self.model, self.tok, ids, self.stop_ids, params,
                                            clean=self.template.clean_reply):
                yield chunk
        finally:
            self.active_streams -= 1


def deployment(num_replicas: int, max_ongoing: int, num_gpus: float):
    return serve.deployment(ChatModel, name="ChatModel", num_replicas=num_replicas,
                            max_ongoing_requests=max_ongoing, max_queued_requests=max_ongoing,
                            ray_actor_options={"num_cpus": 0.5, "num_gpus": num_gpus})
