"""The engine in a process of its own, beside the Serve replica that talks HTTP.

Measured on one H200 (bench/serve_throughput.py): the engine alone decodes 64 streams in 6.8 ms per step,
but inside the replica's process the same step took 11-22 ms, because Serve's streaming of dozens of
replies and the engine's loop shared one Python interpreter lock. So on a GPU the replica starts the
engine in a child process that owns the model, the KV cache and the GPU; the replica keeps the tokenizer,
the detokenizing and the streaming. Between them runs one pipe: requests and cancellations one way, one
message per engine step with every new token the other (a step's tokens for 128 streams are ~2 KB).

`build_engine` is also what the replica runs in-process (the default on CPU, where the child would only
add start-up time).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import threading
import time
from dataclasses import dataclass

from serving.engine import Engine, EngineConfig, Request, StreamQueue, check_adapter, check_admission
from serving.lora import Adapter
from serving.sampling import SamplingParams

KV_MEMORY_SHARE = 0.85     # of the GPU memory left after the weights, for the KV cache
GRAPH_RESERVE_GIB = 4.0    # kept free for activations and CUDA graphs
CPU_MAX_NUM_SEQS = 16
GPU_MAX_NUM_SEQS = 128
EAGER_GRAPH_BUCKET = 2048  # decode graphs captured at start-up up to this attention length; longer on first use


@dataclass
class EngineSpec:
    """What a process needs to load the model and start the engine."""

    folder: str
    bits: int
    dtype: str               # auto | bf16 | fp16 | fp32
    device: str              # cpu | cuda
    trust_remote_code: bool = False
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    max_queued_requests: int = 256
    prefill_chunk: int | None = None
    threads: int = 2         # CPU threads for torch on CPU
    max_loras: int = 0       # adapter slots on the device (0: no adapter pool)
    max_lora_rank: int = 64  # the largest adapter rank the slots hold
    lora_gather_max: int = 16  # steps of up to this many tokens use the gathered kernels (GPU; 0: never)
    prefix_cache: bool = True  # finished sequences' KV kept for the next turn (serving/prefix_cache.py)
    step_tokens: int | None = None  # a step's tokens while streams decode (default: 2048 GPU, 256 CPU)
    decode_gemv: str = "auto"  # steps of <= 4 rows: projections through Triton where faster than cuBLAS ("off": never)


def load(spec: EngineSpec):
    import torch

    from common.models.loader import detect, load_model

    if spec.device == "cpu":
        torch.set_num_threads(max(1, spec.threads))
    dtype = {"auto": torch.bfloat16 if spec.device == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[spec.dtype]
    from pathlib import Path

    return load_model(detect(Path(spec.folder)), bits=spec.bits, dtype=dtype, device=spec.device,
                      trust_remote_code=spec.trust_remote_code).eval()


def model_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None)
               or getattr(model.config, "max_sequence_length", 2048))


def build_engine(model, spec: EngineSpec, sink=None) -> tuple[Engine, str]:
    """The runner and engine for a loaded model, sized from the config and the free GPU memory.
    Returns the engine and the start-up line that says what was chosen."""
    import torch

    from serving.runners import FlatRunner, kv_dtype, runner_class, runner_for

    t0 = time.time()
    seqs = spec.max_num_seqs or (GPU_MAX_NUM_SEQS if spec.device == "cuda" else CPU_MAX_NUM_SEQS)
    per_token = kv_bytes_per_token(model)
    context = model_context(model)
    length, note = spec.max_model_len or context, "the model's context"
    pool, adapters = None, ""
    sites = runner_class(model).lora_sites(model) if spec.max_loras else None
    if sites is not None:  # allocated before the KV cache is sized: the cache gets what is left
        from serving.lora import AdapterPool

        pool = AdapterPool(sites, spec.max_loras, spec.max_lora_rank, kv_dtype(model), torch.device(spec.device),
                           gather_max=spec.lora_gather_max)
        adapters = (f"; adapter pool {spec.max_loras} x rank {spec.max_lora_rank} on {len(sites)} linears "
                    f"({pool.bytes / 2**20:.0f} MiB; kernels: {pool.kernels})")
    elif spec.max_loras:
        adapters = "; no adapters (the generic runner cannot apply them)"
    if spec.device == "cuda" and spec.max_model_len is None and per_token:
        free = torch.cuda.mem_get_info()[0] - GRAPH_RESERVE_GIB * 2**30
        fit = int(free * KV_MEMORY_SHARE // (seqs * per_token)) // 256 * 256
        if fit < length:
            length, note = max(fit, 256), "what the free GPU memory holds"
    length = min(length, context)
    runner = runner_for(model, seqs, length, adapters=pool, decode_gemv=spec.decode_gemv)
    graphs = ""
    if isinstance(runner, FlatRunner) and runner.use_graphs:
        try:
            graphs = f"; {runner.capture(seqs, EAGER_GRAPH_BUCKET)} decode CUDA graphs captured"
        except Exception as err:  # noqa: BLE001 - e.g. a quantized kernel that cannot be captured
            runner.use_graphs, runner.graphs = False, {}
            graphs = f"; decode steps run eagerly (CUDA graph capture failed: {type(err).__name__}: {err})"
    if getattr(runner, "ops_note", ""):
        graphs += f"; {runner.ops_note}"
    chunk = spec.prefill_chunk or (2048 if spec.device == "cuda" else 512)
    step = spec.step_tokens or (2048 if spec.device == "cuda" else 256)
    engine = Engine(runner, EngineConfig(seqs, length, spec.max_queued_requests, chunk, spec.prefix_cache, step),
                    model.config.vocab_size, sink=sink)
    reuse = ("on" if engine.prefix is not None else
             "off" + (" (this runner cannot reuse a prefix)" if spec.prefix_cache else ""))
    line = (f"engine: {runner.family} runner, max_num_seqs {seqs}, max_model_len {length} ({note}), "
            f"max_queued_requests {spec.max_queued_requests}, prefill chunk {chunk} (while streams decode: {step} tokens a step, at "
            f"least {step // 4} of them prompts), KV reuse between turns {reuse}; KV cache "
            f"{seqs * length * per_token / 2**30:.2f} GiB ({per_token / 1024:.1f} KiB per token){adapters}{graphs}; "
            f"ready in {time.time() - t0:.1f} s")
    return engine, line


def gpu_memory() -> dict:
    """This process's GPU memory (the engine's process holds the weights and the KV cache)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_memory_allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "gpu_memory_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token takes in the engine's cache (0 where the runner keeps HF's own cache)."""
    from serving.runners import kv_dtype

    cfg = model.config
    size = kv_dtype(model).itemsize
    if type(model).__name__ == "ChatGLM1ForCausalLM":
        return 2 * cfg.num_layers * cfg.hidden_size * size
    if type(model).__name__ in ("GlmForCausalLM", "Glm4ForCausalLM"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * size
    return 0


# -- the child -------------------------------------------------------------------------------------------

def _child(conn, spec: EngineSpec) -> None:
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    try:
        model = load(spec)
        engine, line = build_engine(model, spec, sink=lambda items: send(
            ("out", [(req.id, item) for req, item in items], engine.metrics.recent_step_seconds())))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        send(("failed", f"{type(err).__name__}: {err}"))
        return
    send(("ready", {"line": line, "config": engine.config, "context": model_context(model),
                    "adapters": engine.adapters is not None}))
    requests: dict[int, Request] = {}
    while True:
        if not conn.poll(1.0):
            if engine.failure:  # the engine thread died (a CUDA error, say): exit, so the replica sees it
                send(("dead", engine.failure))
                return
            continue
        msg = conn.recv()
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, stop_ids, adapter = msg
            req = Request(rid, prompt, params, frozenset(stop_ids), None, None, adapter=adapter)
            requests[rid] = req
            engine.enqueue(req)
        elif kind == "abort" and msg[1] in requests:
            engine.abort(requests[msg[1]])
        elif kind == "done":
            requests.pop(msg[1], None)
        elif kind == "query":
            _, token = msg
            send(("reply", token, {"stats": engine.stats(), "metrics": engine.metrics.text(), "gpu": gpu_memory()}))
        elif kind == "stop":
            engine.shutdown()
            return


# -- the parent (the Serve replica) ----------------------------------------------------------------------

@dataclass
class Pending:
    """The replica's side of a request: where its tokens go."""

    id: int
    queue: StreamQueue
    loop: asyncio.AbstractEventLoop
    max_tokens: int
    done: bool = False


class EngineProcess:
    """The same calls as `Engine` (submit, abort, stats, metrics text), answered by a child process."""

    def __init__(self, spec: EngineSpec, start_timeout: float = 1800):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no Serve threads
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, spec), name="glmops-engine", daemon=True)
        self.proc.start()
        if not self.conn.poll(start_timeout):
            raise RuntimeError(f"the engine process did not start within {start_timeout:.0f} s")
        kind, info = self.conn.recv()
        if kind == "failed":
            raise RuntimeError(f"the engine process failed to start: {info}")
        self.info = info
        self.config: EngineConfig = info["config"]
        self.max_model_len = self.config.max_model_len
        self.pending: dict[int, Pending] = {}
        self.step_seconds: float | None = None
        self._death: str | None = None  # what the child said before it exited
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="glmops-engine-reader", daemon=True)
        self._reader.start()

    def _send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (its process exited or its pipe broke), or None while it can."""
        code = self.proc.exitcode
        if self._death:
            return f"the engine process stopped: {self._death}"
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return f"the engine process exited ({how})"
        if not self._reader.is_alive():
            return "the pipe to the engine process closed"
        return None

    def submit(self, prompt: list[int], params: SamplingParams, stop_ids: list[int],
               adapter: Adapter | None = None) -> Pending:
        if self.failure:
            raise RuntimeError(self.failure)
        check_adapter(adapter, self.has_adapters)
        check_admission(self.config, len(prompt), params, len(self.pending), self._retry_after)
        req = Pending(next(self._ids), StreamQueue(), asyncio.get_running_loop(), params.max_tokens)
        self.pending[req.id] = req
        self._send(("add", req.id, list(prompt), params, list(stop_ids), adapter))
        return req

    @property
    def has_adapters(self) -> bool:
        return bool(self.info.get("adapters"))

    def _retry_after(self) -> float:
        step = self.step_seconds or 0.05
        return max(1.0, round(step * min((p.max_tokens for p in self.pending.values()), default=0), 1))

    def abort(self, req: Pending) -> None:
        if not req.done:
            self._send(("abort", req.id))

    async def query(self) -> dict:
        """The child's stats and metrics text."""
        loop = asyncio.get_running_loop()
        token = next(self._ids)
        fut = loop.create_future()
        self._replies[token] = (loop, fut)
        self._send(("query", token))
        return await asyncio.wait_for(fut, timeout=30)

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._fail_all()
                return
            if msg[0] == "out":
                _, items, self.step_seconds = msg
                by_loop: dict = {}
                for rid, item in items:
                    req = self.pending.get(rid)
                    if req is None:
                        continue
                    if isinstance(item, dict):
                        req.done = True
                        self.pending.pop(rid, None)
                        self._send(("done", rid))
                    by_loop.setdefault(req.loop, []).append((req.queue, item))
                for loop, batch in by_loop.items():
                    _call(loop, _put_all, batch)
            elif msg[0] == "dead":
                self._death = msg[1]
            elif msg[0] == "reply":
                _, token, payload = msg
                loop, fut = self._replies.pop(token, (None, None))
                if loop is not None:
                    _call(loop, lambda f=fut, p=payload: f.done() or f.set_result(p))

    def _fail_all(self) -> None:
        for loop, fut in list(self._replies.values()):  # queries waiting for the child: answer them now
            _call(loop, lambda f=fut: f.done() or f.set_exception(RuntimeError(self.failure or "engine gone")))
        self._replies.clear()
        for req in list(self.pending.values()):
            req.done = True
            _call(req.loop, req.queue.put_nowait, {"finish_reason": "error"})
        self.pending.clear()

    def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def _call(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
