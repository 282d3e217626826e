"""What the serving benchmark's client can measure at all: its streams against a server that only streams.

    python bench/client_ceiling.py --out bench/results/client_ceiling.json

A null server (Starlette under uvicorn, one process, 127.0.0.1) answers /v1/chat/completions with `max_tokens`
server-sent chunks `--token_ms` apart, as our server does at that TPOT, and nothing else. Against it, side by
side: the client bench/serve_throughput.py uses (aiohttp, `measure`) and the httpx client it used before. The
tokens/s each reaches is the most that client can report at that many streams; a serving figure near it
measures the client, not the server. (The null server is single-process Python too: its own ceiling is in
the same numbers.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def null_app(token_ms: float):
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request):
        n = (await request.json())["max_tokens"]

        async def events():
            for _ in range(n):
                yield "data: " + json.dumps({"choices": [{"delta": {"content": "字"}}]}) + "\n\n"
                await asyncio.sleep(token_ms / 1000)
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n, "prompt_tokens": 0}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def httpx_measure(url: str, streams: int, tokens: int) -> dict:
    """The previous client: httpx.AsyncClient with a pool of `streams` connections."""
    import httpx

    from bench.serve_throughput import pct

    async def one(client) -> dict:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
        t0, first, last = time.perf_counter(), None, None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    last = time.perf_counter()
                    first = first or last
        return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1)}

    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return {"streams": streams, "ttft_p50_s": round(pct([r["ttft"] for r in results], 0.5), 3),
            "ttft_p95_s": round(pct([r["ttft"] for r in results], 0.95), 3),
            "tpot_p50_ms": round(1000 * pct([r["tpot"] for r in results], 0.5), 2),
            "aggregate_tok_s": round(streams * tokens / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,32,64,128")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--token_ms", type=float, default=5.0)
    ap.add_argument("--out")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--_serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:
        import uvicorn

        uvicorn.run(null_app(args.token_ms), host="127.0.0.1", port=args._serve, log_level="warning")
        return
    from bench import portable_command
    from bench.serve_throughput import measure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--_serve", str(port), "--token_ms", str(args.token_ms)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        ideal = 1000 / args.token_ms
        rows = []
        print(f"{'client':<10}{'streams':>8}{'TTFT p50':>10}{'p95':>8}{'TPOT p50':>10}{'tok/s':>10}{'ideal':>9}")
        for n in (int(x) for x in args.streams.split(",")):
            for name in ("aiohttp", "httpx"):
                if name == "httpx":
                    r = asyncio.run(httpx_measure(url, n, args.tokens))
                else:
                    m = asyncio.run(measure(url, "hi", n, args.tokens))
                    r = {k: m[k] for k in ("streams", "ttft_p50_s", "ttft_p95_s", "tpot_p50_ms", "aggregate_tok_s")}
                rows.append({"client": name, **r, "ideal_tok_s": round(n * ideal, 1)})
                print(f"{name:<10}{n:>8}{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>8.3f}{r['tpot_p50_ms']:>10.2f}"
                      f"{r['aggregate_tok_s']:>10,.0f}{n * ideal:>9,.0f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": portable_command("client_ceiling.py", args), "date": time.strftime("%Y-%m-%d"),
            "versions": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "token_ms": args.token_ms, "tokens": args.tokens, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
