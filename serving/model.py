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
import time
from dataclasses import replace
from typing import Any

from ray import serve

from common.data import Conversation
from common.templates import TemplateMismatch
from serving import events
from serving.draining import (
    DRAIN_MARGIN_S,  # Serve kills a draining replica this long after our drain timeout
)

log = logging.getLogger("ray.serve")

DRAIN_POLL_S = 0.5
# Chunks a replica sends per second before its streams merge tokens: each chunk crosses two Serve hops (replica →
# ingress → proxy), which cost more than the engine's step at 64 streams. A stream waits
# min(stream_interval, open streams / CHUNK_RATE) after a chunk: one stream gets each token as it comes, 32 or more
# get one chunk per `stream_interval`.
CHUNK_RATE = 800.0
MIN_PAUSE_S = 0.002  # a shorter pause merges nothing (a step takes longer) and only costs a timer
HEALTH_CHECK_PERIOD_S = 2.0   # Serve replaces a replica after 3 failed checks in a row: ~6 s after its engine died
HEALTH_CHECK_TIMEOUT_S = 10.0


async def _shared_drain() -> bool:
    try:
        return await events.drain_requested()
    except Exception:  # noqa: BLE001 - the state actor is unreachable: only Serve's own drain counts then
        return False


def serve_draining_probe():
    """A function that tells whether Serve has begun to drain this replica.

    Ray Serve 2.60 tells a replica's code nothing when it starts to drain (its `__del__` runs only after every
    request finished, and the controller kills it at `graceful_shutdown_timeout_s`); so the replica's own
    flag is read, from the actor instance Ray keeps in this process. Outside a replica, or should a Ray
    upgrade move the flag, the probe says False and Serve's own kill ends what is left
    (tests/test_serving_health.py checks that the replicas find the flag)."""
    try:
        import ray
        from ray._private.worker import global_worker

        me = ray.get_runtime_context().get_actor_id()
        actor = next(a for k, a in global_worker.actors.items() if k.hex() == me)
        impl = actor._replica_impl
        impl._shutting_down  # noqa: B018 - present, or the probe falls back below
        return lambda: bool(impl._shutting_down)
    except Exception as err:  # noqa: BLE001
        log.warning("cannot see when Serve drains this replica (%s): streams left at the drain timeout are "
                    "cut by Serve instead of ended with an error event", err)
        return lambda: False

class ChatModel:
    def __init__(self, model: str, bits: int = 16, dtype: str = "auto", device: str = "auto",
                 template: str | None = None, trust_remote_code: bool = False, tracking_uri: str | None = None,
                 engine: str = "batch", max_num_seqs: int | None = None, max_model_len: int | None = None,
                 max_queued_requests: int = 256, prefill_chunk: int | None = None, prefix_cache: bool = True,
                 step_tokens: int | None = None, stream_interval: float = 0.04,
                 engine_process: bool | None = None, request_timeout_s: float | None = None,
                 drain_timeout_s: float = 30.0, adapters: str | None = None, max_loras: int = 4,
                 max_lora_rank: int = 64, lora_gather_max: int = 16, decode_gemv: str = "auto"):
        import torch

        from serving.loopback import bind_replica_server_to_node

        bind_replica_server_to_node()
        from common.models.loader import detect, load_tokenizer, open_model_folder
        from common.registry import local_model_folder
        from common.templates import get_template
        from serving.adapters import AdapterCatalog, parse_adapters
        from serving.engine_process import EngineProcess, EngineSpec, build_engine, load, model_context

        if engine not in ("batch", "per_request"):
            raise ValueError(f"engine must be 'batch' or 'per_request', not {engine!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = local_model_folder(model, tracking_uri)
        info = detect(folder, model) if folder.is_dir() else open_model_folder(model)
        configured = parse_adapters(adapters, model)
        spec = EngineSpec(str(info.path), bits, dtype, device, trust_remote_code, max_num_seqs, max_model_len,
                          max_queued_requests, prefill_chunk, int(os.environ.get("GLMOPS_SERVE_THREADS", "2")),
                          max_loras if engine == "batch" else 0, max_lora_rank, lora_gather_max, prefix_cache,
                          step_tokens, decode_gemv)
        self.tok = load_tokenizer(info, trust_remote_code)
        self.template = get_template(template or info.template)
        self.stop_ids = self.template.stop_token_ids(self.tok)
        self.name = model
        self.active_streams = 0
        self.stream_interval = stream_interval
        self.engine = self.model = None
        self.request_timeout_s = request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.draining_since: float | None = None
        self._open: set = set()  # the queues of the streams in flight (a drain that times out ends them)
        self._drain_watch: asyncio.Task | None = None
        self._restart_counted = False
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
        pool = self.engine is not None and self.engine.has_adapters
        if configured and not pool:
            raise ValueError("adapters need the adapter pool: engine=batch, max_loras >= 1 and a ChatGLM/GLM model")
        self.catalog = AdapterCatalog(model, info.path, configured, tracking_uri, max_lora_rank, pool)
        self.catalog.resolve_configured()
        if line:
            print(line + (" (engine process)" if in_child else ""), flush=True)
        if int(bits) == 8 and device != "cpu":
            print("warning: bits=8 (bitsandbytes LLM.int8) decodes about 25x slower than bits=4 on a GPU "
                  "(7 tok/s per stream on an H200, bench/NOTES.md); serve with bits=4 or 16", flush=True)
        log.info("serving %s (%s, template %s, %s-bit, %s, engine %s)", model, info.family, self.template.name,
                 bits, device, engine)

    # -- health: Serve asks every `health_check_period_s`; a raise makes it replace this replica -------------
    async def check_health(self) -> None:
        self._watch_for_drain()
        failure = self.engine_failure()
        if failure:
            if not self._restart_counted:  # this replica is about to be replaced: one restart
                self._restart_counted = True
                events.record("engine_restart")
            raise RuntimeError(f"{failure}; Serve replaces this replica")

    def engine_failure(self) -> str | None:
        return getattr(self.engine, "failure", None)

    async def _engine_state(self) -> dict:
        from serving.engine_process import EngineProcess

        if isinstance(self.engine, EngineProcess):
            return await self.engine.query()
        return {"stats": self.engine.stats(), "metrics": self.engine.metrics.text()}  # gpu: this process's

    async def info(self) -> dict[str, Any]:
        from serving.engine_process import gpu_memory

        base = {"id": self.name, "template": self.template.name, "max_context": self.max_model_len}
        failure = self.engine_failure()
        if failure or self.draining_since is not None:
            return {**base, "engine_failed": failure, "draining": self.draining_since is not None}
        state = await self._engine_state() if self.engine else {}
        stats = state.get("stats") or {"running": self.active_streams, "waiting": 0}
        return {**base, "active_streams": stats["running"], **stats, **(state.get("gpu") or gpu_memory())}

    async def metrics(self) -> str:
        from serving.tool_calls import metrics_text

        if self.engine is None or self.engine_failure():
            return metrics_text()
        return (await self._engine_state())["metrics"] + metrics_text()

    async def models(self) -> list[dict]:
        """/v1/models: the base, the configured adapters and those resolved since start-up (loaded: in a slot)."""
        loaded = []
        if self.engine is not None and not self.engine_failure():
            loaded = (await self._engine_state())["stats"].get("adapters_loaded", [])
        return self.catalog.listing(loaded)

    def _prompt(self, conv: dict) -> list[int]:
        return self.template.prompt(self.tok, Conversation.from_dict(conv))

    async def stream(self, conv: dict, sampling: dict, timeout: float | None = None, model: str | None = None):
        """`timeout`: the request's own deadline in seconds (the app's `request_timeout_s` caps it); `model`: the
        base's name or None, else an adapter (serving/adapters.py)."""
        from serving.adapters import BadAdapter, UnknownModel
        from serving.sampling import SamplingParams
        from serving.tool_calls import reply_for

        self._watch_for_drain()
        if self.draining_since is not None:
            yield {"error": "unavailable", "message": "this replica is shutting down and takes no new requests; retry"}
            return
        try:
            if not self.catalog.is_base(model) and self.catalog.needs_io(model):
                yield {"pending": "adapter"}  # a registry lookup or download: the ingress waits longer
            adapter = await self.catalog.resolve(model)
        except UnknownModel as err:
            yield {"error": "model_not_found", "message": str(err)}
            return
        except BadAdapter as err:
            yield {"error": "bad_adapter", "message": str(err)}
            return
        try:
            ids = self._prompt(conv)
        except TemplateMismatch as err:  # tools sent to a model whose template has no tool format
            yield {"error": "bad_request", "message": str(err), "param": "tools"}
            return
        reply = reply_for(self.template, self.tok, conv)  # plain text, or tool calls (serving/tool_calls.py)
        ids += reply.prefix_ids
        params = replace(SamplingParams(**sampling), suppress_first=reply.banned_first)
        if self.engine is None:
            async for chunk in self._stream_per_request(ids, params, reply):
                yield chunk
            return
        from serving.engine import Overloaded, TooLong
        from serving.lora import AdapterError
        from serving.streaming import Detokenizer

        try:
            req = self.engine.submit(ids, params, self.stop_ids, adapter)
        except AdapterError as err:
            yield {"error": "bad_adapter", "message": str(err)}
            return
        except Overloaded as err:
            yield {"error": "overloaded", "message": str(err), "retry_after": err.retry_after}
            return
        except TooLong as err:
            yield {"error": "too_long", "message": str(err)}
            return
        except RuntimeError as err:  # the engine died before this request: Serve is about to replace us
            yield {"error": "engine_failed", "message": f"{err}; the server is restarting its engine"}
            return
        yield {"accepted": True, "prompt_tokens": len(ids)}
        limit = min((t for t in (timeout, self.request_timeout_s) if t), default=None)
        timer = None
        if limit:
            which = "the request's timeout" if timeout and limit == timeout else "the server's request_timeout_s"
            timer = asyncio.get_running_loop().call_later(limit, req.queue.put_nowait, {
                "finish_reason": "error", "error": "timeout",
                "message": f"the request ran past {which} of {limit:g} s and was cancelled"})
        self._open.add(req.queue)
        detok = Detokenizer(self.tok, params.stop, reply.clean)
        end, n = None, 0
        try:
            while end is None:
                # Everything the engine produced since the last chunk goes out as one: under load, one chunk per
                # `stream_interval` per stream keeps Serve's per-chunk cost off the token rate (CHUNK_RATE).
                items = [await req.queue.get()]
                while not req.queue.empty():
                    items.append(req.queue.get_nowait())
                tokens = []
                for item in items:
                    if isinstance(item, dict):
                        end = item
                        break
                    tokens.append(item)
                n += len(tokens)
                text = detok.add(*tokens) if tokens else ""  # one decode for the whole chunk
                if detok.stopped and (end is None or end["finish_reason"] != "error"):
                    end = {"finish_reason": "stop"}
                if text:
                    for chunk in reply.feed(text):
                        yield chunk
                    pause = min(self.stream_interval, len(self._open) / CHUNK_RATE)
                    if pause > MIN_PAUSE_S and end is None:
                        # Tokens of the next pause go out as one chunk; the end cuts the wait short.
                        try:
                            await asyncio.wait_for(req.queue.ended.wait(), pause)
                        except TimeoutError:
                            pass
            if end["finish_reason"] == "error":
                # The engine failed (its end has no reason of ours), or a deadline or the shutdown ended it.
                code = end.get("error", "engine_failed")
                message = end.get("message") or (f"{self.engine_failure() or 'the engine failed'} while "
                                                 "generating this reply; the server is restarting its engine")
                yield {"error": code, "message": message, "completion_tokens": n}
            else:
                for chunk in reply.finish():
                    yield chunk
                yield {"finish_reason": reply.finish_reason or end["finish_reason"], "completion_tokens": n,
                       "prompt_tokens": len(ids)}
        finally:
            if timer is not None:
                timer.cancel()
            self._open.discard(req.queue)
            self.engine.abort(req)  # the client went away, a stop string or a deadline ended it: free the slot

    # -- draining: Serve stops routing to this replica and waits for its streams, then kills it ---------------
    def _watch_for_drain(self) -> None:
        if self._drain_watch is None:
            self._drain_watch = asyncio.get_running_loop().create_task(self._drain_when_told())

    async def _drain_when_told(self) -> None:
        # Told by Serve (a redeploy, a scale-down) or by a stop (serving/draining.py: serve shutdown, serve run).
        serve_draining = serve_draining_probe()
        while not serve_draining() and not await _shared_drain():
            await asyncio.sleep(DRAIN_POLL_S)
        self.draining_since = time.monotonic()
        me = serve.get_replica_context().replica_id.unique_id
        log.info("draining: %d streams may finish within %.0f s (graceful_shutdown_timeout_s)",
                 len(self._open), self.drain_timeout_s)
        while self._open and time.monotonic() - self.draining_since < self.drain_timeout_s:
            events.report_open(me, len(self._open))
            await asyncio.sleep(DRAIN_POLL_S)
        if self._open:
            log.warning("drain timeout: ending %d streams that are still running", len(self._open))
        for queue in list(self._open):
            queue.put_nowait({"finish_reason": "error", "error": "shutdown", "message": (
                f"the server shut down and this reply did not finish within its drain timeout of "
                f"{self.drain_timeout_s:g} s (graceful_shutdown_timeout_s); retry")})
        while self._open:  # the streams take their end
            await asyncio.sleep(0.05)
        events.report_open(me, 0)

    def __del__(self):
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def _stream_per_request(self, ids: list[int], params, reply):
        from serving.streaming import stream_reply

        if len(ids) + params.max_tokens > self.model_context:
            yield {"error": "too_long", "message": f"the prompt is {len(ids)} tokens; with max_tokens "
                   f"{params.max_tokens} that exceeds the model's context of {self.model_context}"}
            return
        yield {"accepted": True, "prompt_tokens": len(ids)}
        self.active_streams += 1
        try:
            async for chunk in stream_reply(self.model, self.tok, ids, self.stop_ids, params,
                                            clean=reply.clean):
                if "delta" in chunk:
                    for out in reply.feed(chunk["delta"]):
                        yield out
                    continue
                if "finish_reason" in chunk and chunk["finish_reason"] != "error":
                    for out in reply.finish():
                        yield out
                    chunk = {**chunk, "finish_reason": reply.finish_reason or chunk["finish_reason"]}
                yield chunk
        finally:
            self.active_streams -= 1


def deployment(num_replicas: int, max_ongoing: int, num_gpus: float, drain_timeout_s: float):
    return serve.deployment(ChatModel, name="ChatModel", num_replicas=num_replicas,
                            max_ongoing_requests=max_ongoing, max_queued_requests=max_ongoing,
                            health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
                            graceful_shutdown_timeout_s=drain_timeout_s + DRAIN_MARGIN_S,
                            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
                            ray_actor_options={"num_cpus": 0.5, "num_gpus": num_gpus})
