"""Several LoRA adapters on one base through the real stack: the base and its adapters side by side in one server.

    python bench/serve_lora.py --tokenizers DIR --out bench/results/serve_lora.json                 # GPU
    python bench/serve_lora.py --model models/tiny-chatglm2 --device cpu --streams 1,4 --adapters 2 \\
        --rank 8 --tokens 16                                                                         # CPU

One server (`adapters=a0=...,a7=...`, `max_loras` = --adapters, `max_lora_rank` = --rank) serves, at each
level of --streams: every stream on the base, then the streams spread over the adapters (round robin), the
same prompts and lengths (the `short` workload: 64-token prompts, 128 new tokens). Then an adapter not yet
on the device (`cold`, read from local disk) is asked for while --load_streams streams run on the base: its
load time (the engine's own histogram), its time to first token, and the other streams' longest gap between
two tokens while it loads against their median. The adapters are random (r = --rank on every linear the job
targets, A ~ N(0, 1/in), B ~ N(0, 0.01²)), written as PEFT writes them; the adapters' size on disk is
what the registry stores per fine-tune.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_throughput import (  # noqa: E402
    WORKLOADS,
    Server,
    add_server_args,
    engine_histograms,
    measure,
    prompt_of,
    save,
    served_model,
)


def random_adapters(model_dir: str, names: list[str], rank: int, out: Path) -> dict[str, Path]:
    """PEFT-layout adapters of rank `rank` on every site the runner applies LoRA to (built from the config on the
    meta device: no weights are loaded)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import common.models  # noqa: F401 - registers ChatGLM-6B with the Auto classes
    from serving.runners import runner_class

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    sites = runner_class(model).lora_sites(model)
    if sites is None:
        raise SystemExit(f"{model_dir}: the engine applies no adapters to this model")
    folders = {}
    for i, name in enumerate(names):
        folder = out / name
        folders[name] = folder
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        tensors, targets = {}, set()
        for site in sites:
            for module, _, width in site.parts:
                a = torch.randn(rank, site.in_features, generator=gen) / site.in_features ** 0.5
                b = torch.randn(width, rank, generator=gen) * 0.01
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
                tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
                targets.add(module.rsplit(".", 1)[-1])
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(targets),
            "bias": "none", "base_model_name_or_path": model_dir, "task_type": "CAUSAL_LM"}))
    return folders


async def _timed_stream(client, url: str, content: str, tokens: int, model: str | None) -> list[float]:
    """Arrival times of a stream's chunks."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "stream": True, **({"model": model} if model else {})}
    times = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", "") and '"content":""' not in line:
                times.append(time.perf_counter())
    return times


async def cold_load(url: str, content: str, background: int, tokens: int) -> dict:
    """`background` streams on the base; 2 s in, one request to the adapter `cold`: its TTFT, and the background
    streams' longest gap between chunks while it loaded against their median gap."""
    import httpx

    limits = httpx.Limits(max_connections=background + 8, max_keepalive_connections=background + 8)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        bg = [asyncio.ensure_future(_timed_stream(client, url, content, tokens, None)) for _ in range(background)]
        await asyncio.sleep(1.0)
        sent = time.perf_counter()
        cold = await _timed_stream(client, url, content, 8, "cold")
        first = cold[0] if cold else time.perf_counter()
        streams = await asyncio.gather(*bg)
    gaps_all, gaps_during = [], []
    for times in streams:
        for t0, t1 in zip(times, times[1:]):
            gaps_all.append(t1 - t0)
            if t1 > sent and t0 < first:
                gaps_during.append(t1 - t0)
    median = sorted(gaps_all)[len(gaps_all) // 2] if gaps_all else None
    return {"cold_ttft_s": round(first - sent, 3), "background_streams": background,
            "background_gap_median_ms": round(1000 * median, 2) if median is not None else None,
            # None: the background streams ended before the adapter's first token (make them longer)
            "background_gap_max_during_load_ms": round(1000 * max(gaps_during), 2) if gaps_during else None}


def adapter_counts(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("glmops_adapter")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(ap)
    ap.add_argument("--adapters", type=int, default=8, help="adapters the streams are spread over (= max_loras)")
    ap.add_argument("--rank", type=int, default=64, help="their rank, on every linear the job targets")
    ap.add_argument("--streams", default="1,64")
    ap.add_argument("--tokens", type=int, default=WORKLOADS["short"][1])
    ap.add_argument("--load_streams", type=int, default=32, help="base streams running while `cold` loads")
    ap.add_argument("--extra", default="", help="more app arguments, e.g. max_num_seqs=64")
    ap.add_argument("--out")
    args = ap.parse_args()
    from bench import portable_command

    command = portable_command("serve_lora.py", args)
    work = Path(args.workdir)
    model = served_model(args)
    names = [f"a{i}" for i in range(args.adapters)] + ["cold"]
    folders = random_adapters(model, names, args.rank, work / f"adapters-r{args.rank}")
    adapter_mb = sum(p.stat().st_size for p in folders["a0"].iterdir()) / 2**20
    model_mb = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**20
    prompt = prompt_of(model, WORKLOADS["short"][0], seed=0)
    app = {"model": model, "device": args.device, "bits": args.bits, "max_loras": str(args.adapters),
           "max_lora_rank": str(args.rank), "adapters": ",".join(f"{n}={f}" for n, f in folders.items()),
           **dict(kv.split("=", 1) for kv in args.extra.split() if "=" in kv)}
    t0 = time.time()
    server = Server(app, work / "serve-lora.log")
    rows: list[dict] = []
    shown = {**app, "model": Path(model).name if args.model is None else args.model, "adapters": f"{len(names)} random"}
    servers = {"lora": {"args": shown, "adapter_mb": round(adapter_mb, 2), "model_mb": round(model_mb, 1)}}
    try:
        servers["lora"]["health"] = server.wait()
        servers["lora"]["startup_s"] = round(time.time() - t0, 1)
        print(f"up in {time.time() - t0:.0f} s; an adapter is {adapter_mb:.1f} MiB, the model {model_mb:.0f} MiB",
              flush=True)
        for n in (int(x) for x in args.streams.split(",")):
            for mode, models in (("base", [None]), ("adapters", names[:args.adapters])):
                before = engine_histograms(server.url)
                row = {"mode": mode, "adapters": len(models) if mode == "adapters" else 0,
                       **asyncio.run(measure(server.url, prompt, n, args.tokens, models))}
                after = engine_histograms(server.url)
                for key, (total, count) in after.items():
                    if key in before and count > before[key][1]:
                        row[key] = round(1000 * (total - before[key][0]) / (count - before[key][1]), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
                save(args.out, servers, rows, command)
        before = adapter_counts(server.url)
        load = {"mode": "cold_load", **asyncio.run(cold_load(server.url, prompt, args.load_streams, args.tokens * 4))}
        after = adapter_counts(server.url)
        loads = after.get("glmops_adapter_load_seconds_count", 0) - before.get("glmops_adapter_load_seconds_count", 0)
        load["adapter_loads"] = loads
        load["adapter_load_s"] = round((after.get("glmops_adapter_load_seconds_sum", 0) -
                                        before.get("glmops_adapter_load_seconds_sum", 0)) / max(loads, 1), 3)
        rows.append(load)
        print(json.dumps(load), flush=True)
    finally:
        server.stop()
        save(args.out, servers, rows, command)
    base = {r["streams"]: r["aggregate_tok_s"] for r in rows if r["mode"] == "base"}
    print(f"\n{'mode':<10}{'adapters':>9}{'streams':>8}{'TTFT p50':>9}{'TPOT p50':>9}{'tok/s/stream':>13}"
          f"{'tok/s total':>12}{'of base':>8}")
    for r in rows:
        if r["mode"] == "cold_load":
            print(f"\ncold adapter: read and copied into a slot in {r['adapter_load_s']} s ({r['adapter_loads']:.0f} load), "
                  f"TTFT {r['cold_ttft_s']} s; {r['background_streams']} base streams: longest gap while loading "
                  f"{r['background_gap_max_during_load_ms']} ms, median {r['background_gap_median_ms']} ms")
            continue
        ratio = r["aggregate_tok_s"] / base[r["streams"]] if base.get(r["streams"]) else float("nan")
        print(f"{r['mode']:<10}{r['adapters']:>9}{r['streams']:>8}{r['ttft_p50_s']:>9.3f}{r['tpot_p50_ms']:>9.2f}"
              f"{r['per_stream_tok_s']:>13.1f}{r['aggregate_tok_s']:>12.1f}{ratio:>8.2f}")
    print(f"registry storage per fine-tune: {adapter_mb:.2f} MiB as an adapter (bf16), {model_mb:.0f} MiB merged")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
