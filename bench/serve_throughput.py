"""Serving throughput through the real stack: `serve run serving:app`, HTTP, server-sent events.

    python bench/serve_throughput.py --tokenizers DIR --out bench/results/serve_throughput.json   # GPU
    python bench/serve_throughput.py --model models/tiny-chatglm2 --device cpu --streams 1,8       # CPU

Side by side in one run: the engine (`engine=batch`, the default) and the old per-request path
(`engine=per_request`); `batch_no_reuse` is the engine with `prefix_cache=false` (KV reuse between turns off);
app arguments of one path follow its name, environment variables of its `serve run` too
(`--paths batch,batch+step_tokens=2048,batch+RAY_SERVE_THROUGHPUT_OPTIMIZED=1`).
Every request generates exactly its tokens (`min_tokens`), greedy, and every stream's prompt is its own (a
number in front: no two share a prefix). Workloads: short (64-token prompts, 128 new tokens) and chat (512-token
prompts, 256 new tokens), at each of --streams concurrent streams, --bursts times (the median burst is
reported); long (2,000-token prompts, 48 new tokens: time to first token) at 1 and 8; turns (--turns conversations at once, each of 5 turns that resend the whole
history: a 300-token first prompt, 256-token replies, 250 new tokens per turn; TTFT per turn); mixed (Poisson
arrivals at --mixed_rate requests/s for --mixed_seconds, prompts lognormal around 450 tokens, replies lognormal
around 150: tokens/s, TPOT and TTFT at saturation).
With no --model, a model of --family (ChatGLM2-6B, ChatGLM-6B, or GLM-4-9B in either format) with random weights is built on the GPU
(bench/gpu_models.py). Prints a table; --out writes every row with the command, GPU
and versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"short": (64, 128), "chat": (512, 256), "long": (2000, 48)}  # long: TTFT at 2,000 tokens (ChatGLM-6B holds 2,048)
TURNS = {"turns": 5, "first_prompt": 300, "reply": 256, "added": 250}  # the multi-turn workload
MIXED = {"prompt_median": 450, "prompt_sigma": 0.6, "reply_median": 150, "reply_sigma": 0.6, "max_prompt": 3000,
         "max_reply": 600}
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def prompt_of(model_dir: str, tokens: int, seed: int) -> str:
    """A user message whose chat prompt is `tokens` tokens long (or as close as the tokenizer allows)."""
    from common.data import Conversation
    from common.models.loader import detect, load_tokenizer
    from common.templates import get_template

    info = detect(Path(model_dir))
    tok, template = load_tokenizer(info), get_template(info.template)
    rng = random.Random(seed)
    from bench.make_length_mix_data import CHARS

    text = "".join(rng.choice(CHARS) for _ in range(tokens * 4))
    lo, hi = 1, len(text)
    while lo < hi:  # the longest prefix that fits
        mid = (lo + hi + 1) // 2
        if len(template.prompt(tok, Conversation(history=[], query=text[:mid]))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


class Server:
    def __init__(self, args: dict, log: Path, env_extra: dict | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        serve = str(Path(sys.executable).with_name("serve"))
        serve = serve if Path(serve).exists() else "serve"
        self.log = open(log, "w")
        cmd = [serve, "run", "serving:app", *(f"{k}={v}" for k, v in {**args, "port": self.port, "ui": "false"}.items())]
        env = {**os.environ, **ENV, **(env_extra or {})}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait(self, timeout: float = 900) -> dict:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
                    return r.json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        raise TimeoutError(f"no /health after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def client(streams: int):
    """The benchmark's HTTP client for `streams` concurrent streams: aiohttp, one connection per stream. The
    httpx client used before reached 15,015 tokens/s at 128 streams of 5 ms tokens against a server that does
    nothing but stream, aiohttp 20,851 (bench/client_ceiling.py, a 2-core machine): below what the engine does."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 8),
                                 timeout=aiohttp.ClientTimeout(total=1800))


async def one_stream(session, url: str, content: str | list[dict], tokens: int, model: str | None = None) -> dict:
    """One streamed request (`content`: the user's message, or the whole message list); its reply's text too."""
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    body = {"messages": messages, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "stream": True, **({"model": model} if model else {})}
    t0 = time.perf_counter()
    first = last = None
    usage = {}
    text = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return {"status": r.status}
        async for line in r.content:  # server-sent events, a line at a time
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                text.append(chunk["choices"][0]["delta"]["content"])
    end = time.perf_counter()
    n = usage.get("completion_tokens", 0)
    return {"status": 200, "ttft": (first or end) - t0, "seconds": end - t0, "tokens": n,
            "prompt_tokens": usage.get("prompt_tokens", 0), "text": "".join(text),
            "tpot": ((last - first) / (n - 1)) if first and last and n > 1 else None}


ENGINE_HISTOGRAMS = {"engine_tpot_ms": "glmops_time_per_output_token_seconds",
                     "engine_ttft_ms": "glmops_time_to_first_token_seconds"}


def engine_histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the engine's own latency histograms from /metrics (empty: not exported). The engine's
    TTFT runs from a request's arrival in the engine to its first token: the rest of the client's is HTTP."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("glmops_")}
    return {key: (vals[f"{name}_sum"], vals[f"{name}_count"]) for key, name in ENGINE_HISTOGRAMS.items()
            if f"{name}_count" in vals}


def prefix_counters(url: str) -> dict[str, float]:
    """The engine's KV-reuse counters so far (/metrics): lookups, hits, prompt tokens saved, evictions."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0].removeprefix("glmops_prefix_cache_").removesuffix("_total"): float(line.split()[1])
            for line in text.splitlines() if line.startswith("glmops_prefix_cache_") and "_total " in line}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


async def measure(url: str, content: str, streams: int, tokens: int, models: list[str | None] = (None,),
                  bursts: int = 1) -> dict:
    """`streams` concurrent streams of `tokens` tokens each, `bursts` times one after the other; stream i asks for
    models[i % len(models)] (None: the base; bench/serve_lora.py spreads streams over adapters).

    One burst at 128 streams lasts ~2 s and its tokens/s varied by 10-25 % between servers of one run
    (results/serve_order_h100.json), so a level reports the median burst and the spread; TTFT and TPOT
    percentiles are over every stream of every burst."""
    results, rates, walls = [], [], []
    async with client(streams) as session:
        for model in models:  # warm-up (and each adapter in its slot)
            await one_stream(session, url, content, 8, model)
        for b in range(bursts):
            t0 = time.perf_counter()
            # each stream its own prompt: numbers in front, so that no two share a prefix, neither within this
            # level and burst nor with an earlier one's streams (whose caches a server with KV reuse keeps)
            burst = await asyncio.gather(*(one_stream(session, url, f"{streams}-{b + 1}-{i + 1}. {content}", tokens,
                                                      models[i % len(models)]) for i in range(streams)))
            walls.append(time.perf_counter() - t0)
            rates.append(sum(r["tokens"] for r in burst if r["status"] == 200) / walls[-1])
            results += burst
    ok = [r for r in results if r["status"] == 200]
    tpots = [r["tpot"] for r in ok if r["tpot"]]
    return {"streams": streams, "ok": len(ok), "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
            "tokens_per_request": tokens, "exact_tokens": all(r["tokens"] == tokens for r in ok),
            "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3),
            "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 3),
            "tpot_p50_ms": round(1000 * pct(tpots, 0.5), 2), "tpot_p95_ms": round(1000 * pct(tpots, 0.95), 2),
            "per_stream_tok_s": round(sum(r["tokens"] / r["seconds"] for r in ok) / max(len(ok), 1), 1),
            "aggregate_tok_s": round(pct(rates, 0.5), 1), "wall_s": round(sum(walls), 2),
            "bursts": bursts, "burst_tok_s": [round(x, 1) for x in rates]}


def _text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text (common characters, about one token each for the GLM tokenizers)."""
    from bench.make_length_mix_data import CHARS

    return "".join(rng.choice(CHARS) for _ in range(tokens))


async def measure_turns(url: str, conversations: int, shape: dict = TURNS) -> dict:
    """`conversations` chats at once, each taking `turns` turns; every turn resends the whole history (as chat
    clients do) with the reply as the server streamed it. TTFT per turn: does turn 5 pay for the history again?"""
    rng = random.Random(7)
    async with client(conversations) as session:
        await one_stream(session, url, "warm-up", 8)

        async def talk(c: int) -> list[dict]:
            messages, turns = [], []
            user = f"{c + 1}. " + _text(rng, shape["first_prompt"])
            for _ in range(shape["turns"]):
                messages.append({"role": "user", "content": user})
                r = await one_stream(session, url, list(messages), shape["reply"])
                turns.append(r)
                messages.append({"role": "assistant", "content": r.get("text", "")})
                user = _text(rng, shape["added"])
            return turns

        t0 = time.perf_counter()
        talks = await asyncio.gather(*(talk(c) for c in range(conversations)))
        wall = time.perf_counter() - t0
    per_turn = []
    for t in range(shape["turns"]):
        ok = [talk[t] for talk in talks if talk[t]["status"] == 200]
        per_turn.append({"turn": t + 1, "ok": len(ok), "prompt_tokens_p50": pct([r["prompt_tokens"] for r in ok], 0.5),
                         "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3),
                         "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 3),
                         "tpot_p50_ms": round(1000 * pct([r["tpot"] for r in ok if r["tpot"]], 0.5), 2)})
    total = sum(r["tokens"] for talk in talks for r in talk if r["status"] == 200)
    return {"streams": conversations, "turns": per_turn, "aggregate_tok_s": round(total / wall, 1),
            "wall_s": round(wall, 2), "last_vs_first_ttft_p50": round(per_turn[-1]["ttft_p50_s"]
                                                                       / max(per_turn[0]["ttft_p50_s"], 1e-9), 2)}


async def measure_mixed(url: str, rate: float, seconds: float, shape: dict = MIXED, seed: int = 11) -> dict:
    """Requests arriving as a Poisson process at `rate` per second for `seconds`, prompt and reply lengths drawn
    lognormal (each prompt its own): what the server sustains, and what each stream gets meanwhile."""
    import math

    rng = random.Random(seed)
    plan, t = [], rng.expovariate(rate)
    while t < seconds:
        draw = lambda median, key: max(8, min(shape[f"max_{key}"], int(math.exp(  # noqa: E731
            rng.gauss(math.log(median), shape[f"{key}_sigma"])))))
        plan.append((t, f"{len(plan) + 1}. " + _text(rng, draw(shape["prompt_median"], "prompt")),
                     draw(shape["reply_median"], "reply")))
        t += rng.expovariate(rate)
    async with client(len(plan)) as session:
        await one_stream(session, url, "warm-up", 8)
        t0 = time.perf_counter()

        async def arrive(at: float, content: str, tokens: int) -> dict:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await one_stream(session, url, content, tokens)

        results = await asyncio.gather(*(arrive(*p) for p in plan))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    tpots = [r["tpot"] for r in ok if r["tpot"]]
    return {"streams": None, "rate_per_s": rate, "seconds": seconds, "requests": len(plan), "ok": len(ok),
            "refused": sum(1 for r in results if r["status"] == 429),
            "prompt_tokens_p50": pct([r["prompt_tokens"] for r in ok], 0.5),
            "reply_tokens_p50": pct([r["tokens"] for r in ok], 0.5),
            "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3),
            "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 3),
            "tpot_p50_ms": round(1000 * pct(tpots, 0.5), 2), "tpot_p95_ms": round(1000 * pct(tpots, 0.95), 2),
            "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1), "wall_s": round(wall, 2)}


def engine_steps(model_dir: str, batches: list[int], mixed: list[tuple[int, int]] = (), bucket_tokens: int = 192,
                 steps: int = 50, profile: bool = False, device: str = "cuda",
                 gemv_modes: tuple[str, ...] = ("auto",)) -> list[dict]:
    """The engine alone, in this process, no HTTP: ms per decode step (graph replay + batched sampling), and per
    mixed step (`mixed`: B decode rows + one P-token prompt chunk in one forward, as the scheduler builds them
    under load). `profile`: the GPU kernels of the smallest decode batch and of the last mixed shape, summed by
    name. Each of `gemv_modes` (the app's decode_gemv) gets its own runner over the same weights, one after the
    other, and the same measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    import common.models  # noqa: F401 - registers ChatGLM-6B's model with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device).eval()
    out = []
    for mode in gemv_modes:
        out += _engine_steps(model, mode, batches, mixed, bucket_tokens, steps, profile, device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the last runner's KV cache goes before the next one's
    return out


def _engine_steps(model, mode: str, batches, mixed, bucket_tokens: int, steps: int, profile: bool,
                  device: str) -> list[dict]:
    import torch

    from serving.runners import RowInput, runner_for
    from serving.sampling import Row, Sampler, SamplingParams

    top = max([*batches, *(b for b, _ in mixed)])
    runner = runner_for(model, top + 1, 4096, decode_gemv=mode)  # the last slot takes the prompt of a mixed step
    note = getattr(runner, "ops_note", "")
    print(f"engine alone, decode_gemv={mode}: {note}", flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        runner.capture(top, 256)
    sampler = Sampler(model.config.vocab_size, top + 2, runner.device, last_token=runner.last_token)
    rng = torch.Generator().manual_seed(0)

    def timed(rows: list, label: str, extra: dict) -> dict:
        greedy = [Row(SamplingParams(1, temperature=0), None, r.slot, []) for r in rows]
        for _ in range(5):
            sampler(runner.forward(rows), greedy).tolist()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            sampler(runner.forward(rows), greedy).tolist()
        ms = (time.perf_counter() - t0) / steps * 1000
        print(f"engine alone, decode_gemv={mode}: {label}: {ms:.2f} ms/step", flush=True)
        return {**extra, "ms_per_step": round(ms, 2)}

    out = [{"ops": note}]
    for b in batches:  # decode rows only: the graph path
        row = timed([RowInput(i, None, bucket_tokens) for i in range(b)], f"batch {b}", {"batch": b})
        out.append({**row, "tok_s": round(b * 1000 / row["ms_per_step"], 1)})
    for b, p in mixed:
        prompt = torch.randint(3, model.config.vocab_size, (p,), generator=rng).tolist()
        rows = [RowInput(i, None, bucket_tokens) for i in range(b)] + [RowInput(top, prompt, 0)]
        out.append(timed(rows, f"{b} decode rows + a {p}-token prompt chunk", {"batch": b, "prompt_tokens": p}))
    if profile:  # where a step's GPU time goes: one stream's decode step (the graph replayed), the last mixed shape
        if batches:
            b0 = min(batches)
            decode = [RowInput(i, None, bucket_tokens) for i in range(b0)]
            out.append(kernel_profile(lambda: runner.forward(decode), sync,
                                      f"{b0} decode row(s), ms per step by kernel"))
        if mixed:
            out.append(kernel_profile(lambda: runner.forward(rows), sync,
                                      f"{b} decode rows + {p}-token prompt, ms per step by kernel"))
    # the runner and its cache go with this frame; the caller empties the allocator's cache
    return [{"decode_gemv": mode, **row} for row in out]


def kernel_profile(step, sync, label: str, repeats: int = 5) -> dict:
    """The GPU kernels of `step` (kernels replayed from a CUDA graph included), summed by name, per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
        sync()
    kernels = {}
    for e in prof.key_averages():
        if str(e.device_type).endswith("CUDA"):  # the kernels themselves, not the ops that launched them
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)
            kernels[e.key[:90]] = (round(us / repeats / 1000, 3), e.count // repeats)
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    found = {"profile": label, "kernels": [{"name": k, "ms": ms, "calls": n} for k, (ms, n) in top_kernels],
             "total_kernel_ms": round(sum(ms for ms, _ in kernels.values()), 2),
             "kernel_launches": sum(n for _, n in kernels.values())}
    print(json.dumps(found, indent=1), flush=True)
    return found


def versions() -> dict:
    import ray
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "ray": ray.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """What the serving benchmarks serve: a folder, or a random-weight ChatGLM2-6B built on the GPU."""
    ap.add_argument("--model", help="serve this folder (default: build a random-weight model of --family on the GPU)")
    ap.add_argument("--family", default="chatglm2", choices=["chatglm2", "chatglm", "glm4", "glm4-chat"],
                    help="with no --model: ChatGLM2-6B, ChatGLM-6B, GLM-4-9B-0414 or glm-4-9b-chat, random "
                         "weights at the real size (bench/gpu_models.py)")
    ap.add_argument("--tokenizers", help="with no --model: a folder with the family's tokenizer "
                                         "(ChatGLM2's tokenizer.model, ChatGLM-6B's ice_text.model)")
    ap.add_argument("--workdir", default="/tmp/glmops-serve-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bits", default="16")


def served_model(args) -> str:
    """The folder to serve: --model, else the random-weight model of --family in --workdir (built once)."""
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        return args.model
    from bench.gpu_models import GLM4_FAMILIES, build

    model = str(Path(args.workdir) / (f"{args.family}-9b-random" if args.family in GLM4_FAMILIES
                                      else f"{args.family}-6b-random"))
    if not (Path(model) / "config.json").is_file():
        build(args.family, Path(model), Path(args.tokenizers) if args.tokenizers else None)
        import torch

        torch.cuda.empty_cache()  # the replica sizes its KV cache from the free GPU memory
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(ap)
    ap.add_argument("--streams", default="1,8,32,64,128")
    ap.add_argument("--bursts", type=int, default=3, help="short/chat: bursts per level, one after the other; the "
                                                          "median burst's tokens/s is reported, with each burst's")
    ap.add_argument("--baseline_streams", default="1,8", help="the per-request path is slow: fewer levels")
    ap.add_argument("--workloads", default="short,chat")
    ap.add_argument("--baseline_workloads", default="short,chat")
    ap.add_argument("--paths", default="batch,per_request")
    ap.add_argument("--extra", default="", help="more app arguments for the engine path, e.g. max_num_seqs=64")
    ap.add_argument("--engine_only", default="", help="first time the engine alone at these batch sizes (GPU)")
    ap.add_argument("--engine_mixed", default="", help="with --engine_only: mixed steps, BxP (B decode rows and a "
                    "P-token prompt chunk), e.g. 128x384,64x1024")
    ap.add_argument("--engine_gemv", default="auto", help="with --engine_only: the app's decode_gemv values to time "
                                                          "side by side, e.g. auto,off")
    ap.add_argument("--engine_profile", action="store_true",
                    help="with --engine_only: the kernels of its smallest decode batch and of the last --engine_mixed step")
    ap.add_argument("--workload_streams", default="long=1,8",
                    help="stream levels of a workload other than --streams (workload=levels, space separated)")
    ap.add_argument("--server_env", default="", help="environment of `serve run` (KEY=VALUE, space separated), e.g. "
                                                    "RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    ap.add_argument("--turns", type=int, default=24, help="workload turns: conversations at once")
    ap.add_argument("--mixed_rate", type=float, default=48.0, help="workload mixed: requests per second")
    ap.add_argument("--mixed_seconds", type=float, default=60.0, help="workload mixed: seconds of arrivals")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.workload_streams = dict(kv.split("=", 1) for kv in args.workload_streams.split())
    work = Path(args.workdir)
    model = served_model(args)
    from bench import portable_command

    command = portable_command("serve_throughput.py", args)
    prompts = {w: prompt_of(model, p, seed=i) for i, (w, (p, _)) in enumerate(WORKLOADS.items())}
    rows, servers = [], {}
    if args.engine_only:
        mixed = [tuple(int(v) for v in bp.split("x")) for bp in args.engine_mixed.split(",") if bp]
        servers["engine_alone"] = engine_steps(model, [int(x) for x in args.engine_only.split(",")], mixed,
                                               profile=args.engine_profile, device=args.device,
                                               gemv_modes=tuple(args.engine_gemv.split(",")))
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
    for path in filter(None, args.paths.split(",")):  # --paths "": the engine alone only
        # a path's own app arguments follow its name, and upper-case ones are environment variables of its
        # `serve run`: batch+step_tokens=2048+RAY_SERVE_THROUGHPUT_OPTIMIZED=1
        name, *own = path.split("+")
        own_env = dict(kv.split("=", 1) for kv in own if kv.split("=", 1)[0].isupper())
        own = [kv for kv in own if not kv.split("=", 1)[0].isupper()]
        app = {"model": model, "device": args.device, "bits": args.bits, "engine": name.removesuffix("_no_reuse")}
        if path.startswith("batch"):
            app.update(dict(kv.split("=", 1) for kv in args.extra.split() if "=" in kv))
            if name == "batch_no_reuse":
                app["prefix_cache"] = "false"
            app.update(dict(kv.split("=", 1) for kv in own))
        else:
            app["max_concurrent_requests"] = "256"
        t0 = time.time()
        server_env = dict(kv.split("=", 1) for kv in args.server_env.split()) | own_env
        server = Server(app, work / f"serve-{path}-{args.bits}.log", server_env)
        try:
            health = server.wait()
            shown = {**app, "model": Path(model).name if args.model is None else args.model}
            health["model"] = shown["model"]
            servers[path] = {"startup_s": round(time.time() - t0, 1), "health": health, "args": shown,
                             "env": server_env}
            print(f"{path}: up in {time.time() - t0:.0f} s: {health}", flush=True)
            engine = path.startswith("batch")
            levels = args.streams if engine else args.baseline_streams
            for w in (args.workloads if engine else args.baseline_workloads).split(","):
                _, tokens = WORKLOADS.get(w, (0, 0))
                for n in (int(x) for x in args.workload_streams.get(w, levels).split(",")):
                    import httpx

                    before = engine_histograms(server.url)
                    if w == "turns":
                        measured = asyncio.run(measure_turns(server.url, args.turns))
                    elif w == "mixed":
                        measured = asyncio.run(measure_mixed(server.url, args.mixed_rate, args.mixed_seconds))
                    else:
                        measured = asyncio.run(measure(server.url, prompts[w], n, tokens, bursts=args.bursts))
                    row = {"path": path, "bits": args.bits, "workload": w, **measured}
                    after = engine_histograms(server.url)
                    for key, (total, count) in after.items():
                        if key in before and count > before[key][1]:  # the engine's own mean over this row
                            row[key] = round(1000 * (total - before[key][0]) / (count - before[key][1]), 2)
                    h = httpx.get(server.url + "/health").json()
                    row["gpu_memory_reserved_gib"] = h.get("gpu_memory_reserved_gib")
                    row["prefix_cache"] = prefix_counters(server.url)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save(args.out, servers, rows, command)  # after every row: a run cut short keeps what it measured
                    if w in ("turns", "mixed"):
                        break  # one level: their own arguments say how much load
        finally:
            server.stop()
    head = (f"{'path':<12}{'bits':>5}{'load':>7}{'streams':>8}{'prompt':>7}{'TTFT p50':>9}{'p95':>7}{'TPOT p50':>9}"
            f"{'p95':>7}{'tok/s/stream':>13}{'tok/s total':>12}{'GPU GiB':>8}{'engine TPOT':>12}{'engine TTFT':>12}"
            f"  bursts (tok/s)")
    print("\n" + head)
    for r in rows:
        if r["workload"] == "turns":
            print(f"{r['path']:<12}{r['bits']:>5} turns: {r['streams']} conversations, TTFT p50 by turn "
                  + ", ".join(f"{t['ttft_p50_s']:.3f} s ({t['prompt_tokens_p50']} tokens)" for t in r["turns"])
                  + f"; turn {len(r['turns'])} / turn 1: {r['last_vs_first_ttft_p50']}; {r['aggregate_tok_s']:.0f} tok/s")
            continue
        if r["workload"] == "mixed":
            print(f"{r['path']:<12}{r['bits']:>5} mixed: {r['rate_per_s']}/s for {r['seconds']} s ({r['ok']} of "
                  f"{r['requests']} ok), {r['aggregate_tok_s']:.0f} tok/s, TPOT p50 {r['tpot_p50_ms']} ms "
                  f"(p95 {r['tpot_p95_ms']}), TTFT p50 {r['ttft_p50_s']} s (p95 {r['ttft_p95_s']})")
            continue
        print(f"{r['path']:<12}{r['bits']:>5}{r['workload']:>7}{r['streams']:>8}{r['prompt_tokens'] or 0:>7}"
              f"{r['ttft_p50_s']:>9.3f}{r['ttft_p95_s']:>7.3f}{r['tpot_p50_ms']:>9.2f}{r['tpot_p95_ms']:>7.2f}"
              f"{r['per_stream_tok_s']:>13.1f}{r['aggregate_tok_s']:>12.1f}{r['gpu_memory_reserved_gib'] or 0:>8}"
              f"{r.get('engine_tpot_ms') or '-':>12}{r.get('engine_ttft_ms') or '-':>12}"
              f"  {' / '.join(f'{x:,.0f}' for x in r.get('burst_tok_s', []))}")
    save(args.out, servers, rows, command)
    if args.out:
        print(f"wrote {args.out}")


def save(out: str | None, servers: dict, rows: list[dict], command: str = "") -> None:
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"command": command,
                                     "date": time.strftime("%Y-%m-%d"), "versions": versions(),
                                     "servers": servers, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
