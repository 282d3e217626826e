"""Data at scale, end to end: N synthetic records through `jobs/finetune.py` on a local Ray (CPU, tiny model).

    python bench/data_pipeline.py --records 1000000 --out bench/results/data_pipeline.json

Runs, one after another, in a fresh work folder:
  baseline    the old path's tokenizer loop (`encode_records`, one process, one core) on the first records
  dry run     cold: validate + tokenize everything on Ray Data into the cache, print the statistics
  train warm  the real job with the cache from the dry run: time to the first training step, --max_steps
  train cold  the real job in a new output folder (nothing cached): tokenize, then train --max_steps
Every run is watched for the peak RSS of each process it starts (driver, Ray Data actors, Ray Train
workers, Ray's own processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import portable_command
from bench.make_large_data import write as write_large
from bench.process_memory import PeakRSS

ROOT = Path(__file__).resolve().parent.parent
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}


def run_job(args: list[str], log: Path) -> dict:
    """Run the job, time its phases from its output, and watch every process it starts."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "jobs/finetune.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV}, bufsize=1)
    first_step = None
    lines = []
    with PeakRSS(proc.pid) as peaks, log.open("w") as f:
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if first_step is None and "train  [" in line:  # the first progress line of rank 0
                first_step = time.time() - t0
        proc.wait()
    out = "".join(lines)
    rate = re.search(r"data: tokenized ([\d,]+) records in ([\d.]+) s \(([\d,]+) records/s, ([\d,]+) per CPU\)", out)
    table = peaks.table()
    kinds: dict[str, float] = {}
    for gib, _, name in table:
        kinds[name] = max(kinds.get(name, 0.0), gib)
    return {"exit_code": proc.returncode, "seconds": round(time.time() - t0, 1),
            "first_step_seconds": round(first_step, 1) if first_step else None,
            "tokenize_seconds": float(rate.group(2)) if rate else None,
            "records_per_second": int(rate.group(3).replace(",", "")) if rate else None,
            "records_per_second_per_cpu": int(rate.group(4).replace(",", "")) if rate else None,
            "cache_used": "data cache: using" in out,
            "killed": "OutOfMemory" in out or "killed" in out.lower() and "memory" in out.lower(),
            "peak_rss_gib": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]},
            "max_rss_gib": round(table[0][0], 2) if table else None, "log": log.name}


def baseline_rate(data: Path, model: Path, n: int) -> float:
    """Records/s of the old path's single-process tokenizer loop, on the first `n` records."""
    code = f"""
import itertools, json, time
from common.training.examples import encode_records
from common.models.loader import load_tokenizer, open_model_folder
from common.templates import get_template
info = open_model_folder({str(model)!r}); tok = load_tokenizer(info)
recs = []
with open({str(data)!r}, encoding="utf-8") as f:
    next(f)
    for line in itertools.islice(f, {n}):
        recs.append(json.loads(line.rstrip().rstrip(",")))
t0 = time.time(); encode_records(recs, tok, get_template(info.template), 512, 512); print(len(recs) / (time.time() - t0))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **ENV})
    return float(out.stdout.split()[-1])


def versions() -> dict:
    import pyarrow
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--max_steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--accumulation", type=int, default=1,
                    help="micro-batches per step and worker (1: the data path, not CPU compute, sets the pace)")
    ap.add_argument("--workdir", default=None, help="where data, caches and logs go (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--runs", default="dry,warm,cold", help="which runs: dry (cold dry run), warm (training "
                    "with the dry run's cache), cold (training from nothing)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="glmops-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from common.models.tiny_model import build_tiny_model

    model = Path(build_tiny_model(str(work / "tiny-chatglm2"), str(ROOT / "data/sample.json")))
    data = work / f"records-{args.records}.json"
    t0 = time.time()
    if not data.is_file():
        write_large(data, args.records, seed=0)
    print(f"data: {args.records:,} records, {data.stat().st_size / 2**20:,.0f} MiB ({time.time() - t0:.0f} s)")
    common = ["--base_model", str(model), "--data_path", str(data), "--num_workers", str(args.workers),
              "--cpus_per_worker", "1", "--max_steps", str(args.max_steps), "--eval_steps", str(args.max_steps),
              "--logging_steps", "1", "--bits", "4", "--lora_r", "8", "--gradient_checkpointing", "false",
              "--gradient_accumulation_steps", str(args.accumulation)]
    base = baseline_rate(data, model, min(20_000, args.records))
    print(f"baseline (old loop, 1 process): {base:,.0f} records/s")
    runs = {}
    warm_out = work / "out-warm"
    import shutil

    todo = args.runs.split(",")
    if "dry" in todo:
        shutil.rmtree(warm_out, ignore_errors=True)
        runs["dry run (cold)"] = run_job([*common, "--dry_run", "--output_dir", str(warm_out)], work / "dry.log")
    if "warm" in todo:
        runs["train (cache)"] = run_job([*common, "--output_dir", str(warm_out), "--mlflow_tracking_uri",
                                         f"sqlite:///{warm_out}/mlflow.db"], work / "train-warm.log")
    if "cold" in todo:
        shutil.rmtree(work / "out-cold", ignore_errors=True)
        cold = work / "out-cold"
        runs["train (cold)"] = run_job([*common, "--output_dir", str(cold), "--mlflow_tracking_uri",
                                        f"sqlite:///{cold}/mlflow.db"], work / "train-cold.log")
    cpus = os.cpu_count()
    print(f"\n{args.records:,} records, {args.workers} workers, {cpus} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    print(f"{'run':<16}{'exit':>5}{'wall s':>8}{'1st step s':>11}{'tokenize s':>11}{'rec/s':>8}{'rec/s/CPU':>10}"
          f"{'max RSS GiB':>12}  largest processes")
    for name, r in runs.items():
        largest = ", ".join(f"{k} {v:.2f}" for k, v in list(r["peak_rss_gib"].items())[:3])
        print(f"{name:<16}{r['exit_code']:>5}{r['seconds']:>8.0f}{r['first_step_seconds'] or '-':>11}"
              f"{r['tokenize_seconds'] or '-':>11}{r['records_per_second'] or '-':>8}"
              f"{r['records_per_second_per_cpu'] or '-':>10}{r['max_rss_gib']:>12.2f}  {largest}")
    print(f"{'baseline loop':<16}{'':>5}{'':>8}{'':>11}{'':>11}{base:>8.0f}{base:>10.0f}")
    result = {"command": portable_command("data_pipeline.py", args), "records": args.records,
              "data_mib": round(data.stat().st_size / 2**20), "workers": args.workers, "cpus": cpus,
              "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "versions": versions(),
              "baseline_records_per_second_one_process": round(base), "runs": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
