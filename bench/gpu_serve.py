"""Serving throughput: the real Serve app, by default on a random-weight ChatGLM2-6B on a GPU, bf16 and NF4.

    python bench/gpu_serve.py --tokenizers DIR [--streams 1,8] [--tokens 128]
    python bench/gpu_serve.py --model models/tiny-chatglm2-finetune --device cpu --bits 16   # the CPU demo model

Starts a local Ray, deploys `serving:app` (the API only; no Gradio on the GPU host), and sends 1 and 8
concurrent streamed requests of exactly --tokens new tokens each. Prints time to first token, per-stream
and aggregate tokens/s. Needs CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def one_stream(client, url: str, tokens: int) -> tuple[float, float, int]:
    body = {"messages": [{"role": "user", "content": "写一首关于大海的诗。"}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                elif chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, n


async def measure(url: str, streams: int, tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, 8)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    total = sum(n for _, _, n in results)
    return {"streams": streams, "ttft_s": round(sum(f for f, _, _ in results) / streams, 3),
            "per_stream_tok_s": round(sum(n / t for _, t, n in results) / streams, 1),
            "aggregate_tok_s": round(total / wall, 1), "tokens": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", help="with no --model: folder with tokenizer.model for the random model")
    ap.add_argument("--model", help="serve this folder instead of building a random ChatGLM2-6B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--workdir", default="/tmp/glmops-gpu")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from bench.gpu_models import build
    from serving import AppArgs, app

    folder = Path(args.model) if args.model else Path(args.workdir) / "chatglm2"
    if not (folder / "config.json").is_file():
        build("chatglm2", folder, Path(args.tokenizers))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    for bits in map(int, args.bits.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.run(app(AppArgs(model=str(folder.resolve()), bits=bits, device=args.device, port=port, ui=False)),
                  name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for n in map(int, args.streams.split(",")):
            label = {4: "NF4", 8: "int8"}.get(bits, "bf16" if args.device == "cuda" else "fp32")
            row = {"weights": label, **asyncio.run(measure(url, n, args.tokens))}
            rows.append(row)
            print(json.dumps(row), flush=True)
        serve.shutdown()
    print("\n| weights | streams | time to first token s | tok/s per stream | tok/s aggregate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['streams']} | {r['ttft_s']} | {r['per_stream_tok_s']} | {r['aggregate_tok_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
