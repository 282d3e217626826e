"""The continuous-batching engine: one loop per replica owns the model, the KV cache and the GPU.

Requests are submitted from the replica's asyncio loop and stream their tokens back into it. The engine
thread repeats one iteration:

  1. take in new requests and cancellations (a cancelled or finished request frees its slot at once);
  2. admit waiting requests while slots are free (first come, first served); a request whose prompt starts
     with what a finished request left in its slot takes that slot and skips that part of its prefill
     (serving/prefix_cache.py: KV reuse between a conversation's turns);
  3. plan the step: one decode row for every running request, and the prompts of admitted requests (first
     come, first served) in chunks within the step's token budget: `prefill_chunk` prompt tokens while
     nothing decodes; while streams decode, `step_tokens` tokens in all (each decode row counts one, the
     prompts get the rest, at least a quarter of it). A step's time follows its tokens, so under a burst the
     running streams keep their pace and the newcomers' time to first token grows instead;
  4. run it: the prompt chunks and the decode rows in one forward (the weights are read once per step, not
     once for the prompts and once more for the decode rows); a step of decode rows only replays a CUDA
     graph on GPU;
  5. sample all of them at once on the device, then hand each new token to its stream.

Steps overlap: step n + 1 is launched before step n's tokens are read. A decode row's input is its
slot's last sampled token, which stays on the device (`Runner.last_token`), and its position is known
from how many tokens were scheduled; so the host work of a step (reading tokens, stop checks, streaming,
metrics, planning the next batch) runs while the GPU computes the next one. A request that stops at step n
has had one more row computed in step n + 1; that token is dropped. Its slot can be reused at once: all
work goes to one stream in order, and a position the stale row wrote is rewritten before it is read.

Adapters: a request may name a LoRA adapter (serving/lora.py). It is admitted once its adapter holds a slot
of the runner's adapter pool; while the adapter is read from disk, or while every slot is held, it waits and
the requests behind it go ahead. It holds the slot until it ends.

Limits, all named and enforced at submit time: `max_num_seqs` running sequences (the KV cache slots),
`max_model_len` tokens per sequence (prompt + max_tokens), `max_queued_requests` waiting. A request
over the length limit is refused with `TooLong` (a 400); one that finds the queue full with
`Overloaded` (a 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from serving.lora import Adapter, AdapterError
from serving.metrics import EngineMetrics
from serving.prefix_cache import PrefixCache
from serving.runners import RowInput, Runner, to_device
from serving.sampling import Row, Sampler, SamplingParams

log = logging.getLogger("ray.serve")


class Overloaded(Exception):
    def __init__(self, retry_after: float, message: str):
        super().__init__(message)
        self.retry_after = retry_after


class TooLong(Exception):
    pass


@dataclass
class EngineConfig:
    max_num_seqs: int
    max_model_len: int
    max_queued_requests: int
    prefill_chunk: int = 2048  # prompt tokens in a step while nothing decodes
    prefix_cache: bool = True  # finished sequences' KV stays in their slots for a later prompt that starts with it
    step_tokens: int | None = None  # a step's tokens while streams decode (decode rows + prompt tokens); None: no cap

    def prompt_budget(self, decoding: int) -> int:
        """Prompt tokens a step may take beside `decoding` decode rows: prompts always get at least a quarter of
        `step_tokens`, so a full batch of streams cannot hold every newcomer back until one of them ends."""
        if not decoding or self.step_tokens is None:
            return self.prefill_chunk
        return min(self.prefill_chunk, max(self.step_tokens - decoding, self.step_tokens // 4))


def check_admission(config: EngineConfig, prompt_len: int, params: SamplingParams, in_flight: int,
                    retry_after) -> None:
    """The limits every request meets at submit: its length (TooLong) and the room left (Overloaded).
    `in_flight`: requests running or waiting now; `retry_after()`: the seconds to suggest."""
    limit = config.max_model_len
    if prompt_len + params.max_tokens > limit:
        raise TooLong(f"the prompt is {prompt_len} tokens; with max_tokens {params.max_tokens} that is "
                      f"{prompt_len + params.max_tokens}, over this server's max_model_len of {limit}")
    if in_flight >= config.max_num_seqs + config.max_queued_requests:
        running = min(in_flight, config.max_num_seqs)
        raise Overloaded(retry_after(), f"the server is busy: {running} requests running (max_num_seqs "
                         f"{config.max_num_seqs}) and {in_flight - running} waiting (max_queued_requests "
                         f"{config.max_queued_requests})")


def check_adapter(adapter: Adapter | None, has_pool: bool) -> None:
    """A request naming an adapter needs an engine with an adapter pool (AdapterError otherwise)."""
    if adapter is not None and not has_pool:
        raise AdapterError(f"adapter {adapter.name}: this server runs without an adapter pool (max_loras=0, or "
                           "a model the adapter pool cannot serve)")


class StreamQueue(asyncio.Queue):
    """A request's tokens (ints), then its end (a dict); `ended` is set as soon as the end is queued, so a
    stream that waits to merge tokens into fewer chunks never holds its last chunk back."""

    def __init__(self):
        super().__init__()
        self.ended = asyncio.Event()

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        if isinstance(item, dict):
            self.ended.set()


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop | None
    queue: asyncio.Queue | None
    arrived: float = field(default_factory=time.monotonic)
    slot: int = -1
    prefilled: int = 0          # prompt tokens already in the cache
    scheduled: int = 0          # reply tokens sampled or being sampled (>= len(output))
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    adapter: Adapter | None = None  # the LoRA adapter it runs with (None: the base model)
    lora: int = -1              # its adapter's slot in the adapter pool, once admitted
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig, vocab_size: int, *, name: str = "engine",
                 sink=None):
        """`sink(items)` receives each step's (request, token or end) pairs; by default they go to each
        request's asyncio queue (serving/engine_process.py sends them to another process instead)."""
        self.runner, self.config = runner, config
        self.sink = sink or _to_event_loops
        self.device = runner.device
        self.sampler = Sampler(vocab_size, config.max_num_seqs + 1, self.device, last_token=runner.last_token)
        self.metrics = EngineMetrics(config.max_num_seqs, config.max_model_len)
        self.adapters = getattr(runner, "adapters", None)  # the runner's AdapterPool, or None
        if self.adapters is not None:
            self.adapters.metrics = self.metrics
            self.adapters.on_read = lambda: self._post("wake", None)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        # slots holding a finished sequence's KV (free to take, but a matching prompt takes them first)
        self.prefix = PrefixCache() if config.prefix_cache and getattr(runner, "reuses_prefixes", False) else None
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stopped = False
        self._error: BaseException | None = None
        self._outbox: list[tuple[Request, object]] = []  # tokens and ends of this step, delivered together
        self._in_flight: Launched | None = None  # the step launched but not yet read
        self._last_done = time.perf_counter()
        # GLMOPS_ENGINE_TRACE=FILE: one JSON line per step (what it ran, and where its time went).
        trace = os.environ.get("GLMOPS_ENGINE_TRACE")
        self._trace = open(trace, "a", buffering=1) if trace else None
        self._test_hooks = _test_hooks_from_env()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- the asyncio side ---------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, stop_ids: list[int],
               adapter: Adapter | None = None) -> Request:
        """Queue a request; its tokens arrive in `request.queue` (ints, then None when it is done)."""
        if self._error is not None:
            raise RuntimeError(f"the engine stopped: {self._error}")
        check_adapter(adapter, self.has_adapters)
        pending = len(self.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")
        try:
            check_admission(self.config, len(prompt), params, len(self.running) + pending, self._retry_after)
        except Overloaded:
            self.metrics.rejected.inc()
            raise
        req = Request(next(self._ids), list(prompt), params, frozenset(stop_ids), asyncio.get_running_loop(),
                      StreamQueue(), adapter=adapter)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed)
        self._post("add", req)
        return req

    @property
    def has_adapters(self) -> bool:
        return self.adapters is not None

    def abort(self, req: Request) -> None:
        if not req.done:
            self._post("abort", req)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "free_slots": self._free(), "kept_for_reuse": len(self.prefix or ()), "max_num_seqs": self.config.max_num_seqs,
                "max_model_len": self.config.max_model_len, "max_queued_requests": self.config.max_queued_requests,
                "kv_cache_used_tokens": sum(r.length for r in self.running),
                "adapters_loaded": self.adapters.loaded() if self.adapters is not None else []}

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (its loop stopped on an error), or None while it can."""
        if self._error is not None:
            return f"the engine loop stopped: {type(self._error).__name__}: {self._error}"
        if not self._thread.is_alive() and not self._stopped:
            return "the engine thread exited"
        return None

    def shutdown(self) -> None:
        self._stopped = True
        self._post("stop", None)
        self._thread.join(timeout=10)

    def _retry_after(self) -> float:
        # About the time the running requests need to free one slot: their remaining tokens at the
        # current step time (at least a second: clients should not hammer a full server).
        step = self.metrics.recent_step_seconds() or 0.05
        remaining = min((r.params.max_tokens - len(r.output) for r in self.running), default=0)
        return max(1.0, round(remaining * step, 1))

    def _post(self, kind: str, req: Request | None) -> None:
        with self._wake:
            self._inbox.append((kind, req))
            self._wake.notify()

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._take_inbox()
                if self._test_hooks:
                    self._test_hooks(self.running)
                if not self.running and not self.waiting and self._in_flight is None:
                    with self._wake:
                        if not self._inbox and not self._stopped:
                            self._wake.wait(timeout=1.0)
                    continue
                self._admit()
                launched = self._launch()
                if self._in_flight is not None:
                    self._complete(self._in_flight)
                self._in_flight = launched
                if launched is None:  # requests wait for their adapter to be read: sleep until it is
                    with self._wake:
                        if not self._inbox and not self._stopped:
                            self._wake.wait(timeout=0.05)
        except BaseException as err:  # noqa: BLE001 - every stream must end, with the cause logged
            log.exception("engine loop failed")
            self._error = err
            for r in list(self.running) + list(self.waiting):
                self._finish(r, error=True)

    def _take_inbox(self) -> None:
        with self._wake:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, req in items:
            if kind == "add":
                self.waiting.append(req)
                self.metrics.waiting.set(len(self.waiting))
            elif kind == "abort" and not req.done:
                if req in self.waiting:
                    self.waiting.remove(req)
                self._finish(req, cancelled=True)

    def _free(self) -> int:
        """Slots a request can take: empty ones and those only kept for reuse."""
        return len(self.free_slots) + len(self.prefix or ())

    def _take_slot(self, req: Request) -> None:
        """Give `req` a slot: the kept one sharing the longest prefix with its prompt (that part is not prefilled
        again), else an empty one, else the kept one unused longest."""
        if self.prefix is not None:
            key = req.adapter.name if req.adapter is not None else None
            slot, shared = self.prefix.match(key, req.prompt)
            self.metrics.prefix_lookups.inc()
            if slot is not None:
                self.prefix.take(slot)
                # the last prompt token is computed again: its logits give the first reply token
                req.slot, req.prefilled = slot, min(shared, len(req.prompt) - 1)
                self.metrics.prefix_hits.inc()
                self.metrics.prefix_tokens_saved.inc(req.prefilled)
                return
            if not self.free_slots:
                req.slot = self.prefix.oldest()
                self.prefix.take(req.slot)
                self.metrics.prefix_evictions.inc()
                return
        req.slot = self.free_slots.pop()

    def _admit(self) -> None:
        passed: list[Request] = []  # waiting for their adapter: the requests behind them go first
        while self.waiting and self._free():
            req = self.waiting.popleft()
            if req.adapter is not None:
                try:
                    req.lora = self.adapters.acquire(req.adapter)
                except AdapterError as err:
                    self._finish(req, error=True, message=str(err))
                    continue
                if req.lora is None:
                    req.lora = -1
                    passed.append(req)
                    continue
            self._take_slot(req)
            self.sampler.start(req.slot, req.prompt)
            self.running.append(req)
        self.waiting.extendleft(reversed(passed))
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.running.set(len(self.running))

    def _launch(self) -> Launched | None:
        """Plan and launch one step: one decode row for every request whose next token can be computed, prompt
        chunks within the step's budget, one forward over all of them, the sampling. Nothing here waits for
        the GPU."""
        t0 = time.perf_counter()
        decode: list[tuple[Request, RowInput]] = []
        prompts: list[Request] = []
        for req in self.running:
            if req.prefilled < len(req.prompt):
                prompts.append(req)
            elif 0 < req.scheduled < req.params.max_tokens:
                decode.append((req, RowInput(req.slot, None, len(req.prompt) + req.scheduled - 1, req.lora)))
        budget = self.config.prompt_budget(len(decode))
        chunked = getattr(self.runner, "chunked_prefill", True)
        prefill: list[tuple[Request, RowInput]] = []
        for req in prompts:
            if budget <= 0:
                break
            left = len(req.prompt) - req.prefilled
            take = min(left, budget) if chunked else left  # a runner that cannot chunk takes a prompt whole
            prefill.append((req, RowInput(req.slot, req.prompt[req.prefilled:req.prefilled + take], req.prefilled,
                                          req.lora)))
            budget -= take
        if not prefill and not decode:
            return None
        # Prompt chunks first, then the decode rows: the logits of each row's last token, in that order. Only the
        # rows that end their prompt or decode are sampled.
        rows = [row for _, row in prefill] + [row for _, row in decode]
        out = self.runner.forward(rows)
        sampled: list[Request] = []
        keep: list[int] = []
        for i, (req, row) in enumerate(prefill):
            req.prefilled += len(row.tokens)
            if req.prefilled >= len(req.prompt):
                sampled.append(req)
                keep.append(i)
        sampled += [req for req, _ in decode]
        keep += range(len(prefill), len(rows))
        logits = out if len(keep) == len(rows) else out[to_device(keep, self.device)]
        tokens = host = event = None
        if sampled:
            rows = [Row(req.params, req.generator, req.slot,
                        (sorted(req.stop_ids) if req.scheduled < req.params.min_tokens else [])
                        + (list(req.params.suppress_first) if req.scheduled == 0 else [])) for req in sampled]
            tokens = self.sampler(logits, rows)  # and last_token
            for req in sampled:
                req.scheduled += 1
            if self.device.type == "cuda":  # read back without waiting: the next step is launched first
                host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = tokens
        return Launched(sampled, host, event, t0, len(decode), sum(len(r.tokens) for _, r in prefill), len(prefill),
                        time.perf_counter())

    def _complete(self, step: Launched) -> None:
        """Read a launched step's tokens and hand them to their streams."""
        t0 = time.perf_counter()
        if step.event is not None:
            step.event.synchronize()
        t1 = time.perf_counter()
        if step.requests:
            now = time.monotonic()
            for req, tok in zip(step.requests, step.tokens.tolist()):
                if not req.done:  # else: it stopped or left while this step ran; the token is dropped
                    self._emit(req, tok, now)
        self._deliver()
        done = time.perf_counter()
        self.metrics.step(done - max(step.started, self._last_done), step.decoded, step.prefilled)
        if self._trace:
            self._trace.write(json.dumps({
                "t": round(step.started, 4), "launch_ms": round(1000 * (step.launched - step.started), 2),
                "wait_ms": round(1000 * (t1 - t0), 2), "emit_ms": round(1000 * (done - t1), 2),
                "step_ms": round(1000 * (done - self._last_done), 2), "prefill_rows": step.prefill_rows,
                "prefill_tokens": step.prefilled, "decode_rows": step.decoded, "waiting": len(self.waiting)}) + "\n")
        self._last_done = done
        self.metrics.kv_used.set(sum(r.length for r in self.running))

    def _emit(self, req: Request, token: int, now: float) -> None:
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrived)
        elif req.last_token_at is not None:
            self.metrics.tpot.observe(now - req.last_token_at)
        req.last_token_at = now
        stop = token in req.stop_ids and len(req.output) >= req.params.min_tokens
        if not stop:
            req.output.append(token)
            self.metrics.generated.inc()
            self._outbox.append((req, token))
        if stop or len(req.output) >= req.params.max_tokens:
            self._finish(req, reason="stop" if stop else "length")

    def _finish(self, req: Request, *, reason: str = "stop", cancelled: bool = False, error: bool = False,
                message: str | None = None) -> None:
        """`message`: an error of this request alone (its adapter failed to load), sent to its client."""
        if req.done:
            return
        req.done = True
        if req in self.running:
            self.running.remove(req)
            self.runner.release(req.slot)
            if self.prefix is not None and not error and req.prefilled > 0:
                # Keys and values are in the cache for the prompt tokens prefilled and for every reply token but
                # the last (each is written when the token is fed back; the last one may not have been).
                valid = req.prompt[:req.prefilled] + (req.output[:-1] if req.prefilled == len(req.prompt) else [])
                self.prefix.keep(req.slot, req.adapter.name if req.adapter is not None else None, valid)
            else:
                self.free_slots.append(req.slot)
            if req.lora >= 0:
                self.adapters.release(req.lora)
        if cancelled:
            self.metrics.cancelled.inc()
        elif not error:
            self.metrics.finished.inc()
        end = {"finish_reason": "error" if error else ("cancelled" if cancelled else reason)}
        if message:
            end.update(error="adapter_failed", message=message)
        self._outbox.append((req, end))
        self.metrics.running.set(len(self.running))
        if cancelled or error:
            self._deliver()

    def _deliver(self) -> None:
        if self._outbox:
            items, self._outbox = self._outbox, []
            self.sink(items)

    def enqueue(self, req: Request) -> None:
        """Queue a request made elsewhere (limits already checked by the caller)."""
        if req.params.seed is not None and req.generator is None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.params.seed)
        self._post("add", req)


def _test_hooks_from_env():
    """Test-only, read once at start-up and run each engine step: GLMOPS_TEST_ENGINE_FAULT_AFTER=n raises in the
    engine loop once a running request has n tokens, as a CUDA error would; GLMOPS_TEST_ENGINE_STEP_DELAY_S=s
    makes every step last s longer, so the tiny model's replies take as long as a real model's
    (tests/test_serving_health.py). None when neither is set."""
    after = int(os.environ.get("GLMOPS_TEST_ENGINE_FAULT_AFTER") or 0)
    delay = float(os.environ.get("GLMOPS_TEST_ENGINE_STEP_DELAY_S") or 0)
    if not after and not delay:
        return None

    def hooks(running: list[Request]) -> None:
        if after and any(len(r.output) >= after for r in running):
            raise RuntimeError(f"injected engine fault after {after} tokens (GLMOPS_TEST_ENGINE_FAULT_AFTER)")
        if delay and running:
            time.sleep(delay)

    return hooks


@dataclass
class Launched:
    """A step on its way: who was sampled, and where their tokens arrive on the host."""

    requests: list[Request]
    tokens: torch.Tensor | None  # on the host (pinned) once `event` has passed
    event: object | None          # torch.cuda.Event, None on CPU
    started: float
    decoded: int
    prefilled: int
    prefill_rows: int = 0
    launched: float = 0.0


def _to_event_loops(items: list) -> None:
    """One wake-up of each event loop per step, not one per token (64 streams make thousands a second)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for req, item in items:
        by_loop.setdefault(req.loop, []).append((req.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that loop is closed: nobody is listening any more
            pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
