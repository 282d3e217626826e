"""What KV reuse costs a workload with no shared prefix: the engine's host work per admitted request.

    python bench/prefix_cache_cost.py --out bench/results/prefix_cache_cost.json

With `prefix_cache` on, every admission looks its prompt up (one hash per 32-token block), and every finished
request is indexed (the same hashes of prompt + reply); when no slot is free a kept one is evicted. With it
off, none of that runs; the GPU work is the same either way (a request that matches nothing prefills its
whole prompt). So the cost on a workload with no shared prefix is this host time, set here against the
engine's own time per request at the same shape: `--step_ms` (the measured decode step at `--streams`
concurrent streams, e.g. 5.0 ms at 128 on one H200: bench/results/serve_step_tokens.json) times the reply's
tokens, shared by the streams. Prompts and replies are random (no two share a block), the cache full (every
lookup misses and evicts), as under a long run of distinct requests.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def per_request_us(slots: int, prompt: int, reply: int, requests: int, seed: int = 0) -> float:
    """Microseconds of lookup + eviction + indexing per request, with all `slots` kept and no match."""
    from serving.prefix_cache import PrefixCache

    rng = random.Random(seed)
    text = lambda n: [rng.randrange(65_000) for _ in range(n)]  # noqa: E731
    cache = PrefixCache()
    for slot in range(slots):
        cache.keep(slot, None, text(prompt + reply - 1))
    prompts = [text(prompt) for _ in range(requests)]
    replies = [text(reply - 1) for _ in range(requests)]
    t0 = time.perf_counter()
    for p, r in zip(prompts, replies):
        slot, _ = cache.match(None, p)
        assert slot is None  # random prompts share no block with what is kept
        victim = cache.oldest()
        cache.take(victim)
        cache.keep(victim, None, p + r)
    return (time.perf_counter() - t0) / requests * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=128, help="max_num_seqs (kept sequences)")
    ap.add_argument("--shapes", default="64x128,512x256,2000x256", help="prompt x reply tokens")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--step_ms", type=float, default=5.0)
    ap.add_argument("--out")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from bench import portable_command

    rows = []
    print(f"{'prompt':>7}{'reply':>7}{'host us/request':>17}{'engine ms/request':>19}{'cost':>9}")
    for shape in args.shapes.split(","):
        prompt, reply = (int(x) for x in shape.split("x"))
        us = per_request_us(args.slots, prompt, reply, args.requests)
        engine_ms = args.step_ms * reply / args.streams  # the engine's time a request takes at this load
        rows.append({"prompt_tokens": prompt, "reply_tokens": reply, "host_us_per_request": round(us, 1),
                     "engine_ms_per_request": round(engine_ms, 2), "cost": round(us / 1000 / engine_ms, 4)})
        print(f"{prompt:>7}{reply:>7}{us:>17.1f}{engine_ms:>19.2f}{us / 1000 / engine_ms:>9.2%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": portable_command("prefix_cache_cost.py", args), "date": time.strftime("%Y-%m-%d"),
            "versions": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
            "slots": args.slots, "streams": args.streams, "step_ms": args.step_ms, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
