"""Scaling of the real fine-tune job: `jobs/finetune.py` through Ray Train on 1 GPU, then on 2.

    python3 bench/train_scaling.py --tokenizer .gpuassets/tokenizer.model --out $OUT/train_scaling.json
    python3 bench/train_scaling.py --family chatglm --tokenizer .gpuassets/ice_text.model --workers 1  # ChatGLM-6B

Same model and data as bench/train_throughput.py (random-weight ChatGLM2-6B in NF4, the length mix),
the job's defaults otherwise. Each worker packs its own micro-batches, so two workers take twice the
tokens per optimizer step; the figure compared is the job's own "training steps" throughput (all
workers, after two warm-up steps, evals excluded). Prints a table; the ratio is 2 GPUs over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import portable_command  # noqa: E402
from bench.train_throughput import build_checkpoint, make_records  # noqa: E402

STEPS_LINE = re.compile(r"training steps:\s+([\d,]+) tokens/s")
PEAK_LINE = re.compile(r"peak memory:\s+([\d.]+) GiB")


def run_job(workers: int, args, data: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "jobs/finetune.py"), "--base_model", str(Path(args.workdir) / "model"),
           "--local_files_only", "--data_path", str(data), "--eval_ratio", "0.01", "--num_workers", str(workers),
           "--max_steps", str(args.steps), "--eval_steps", str(args.steps), "--logging_steps", "5",
           "--eval_generate_samples", "0",  # the figure excludes evals; replies would only lengthen the run
           "--max_source_length", "1024", "--max_target_length", "1024", "--gradient_accumulation_steps", "1",
           "--warmup_steps", "0", "--output_dir", str(Path(args.workdir) / f"runs-{workers}"),
           "--mlflow_tracking_uri", args.mlflow_tracking_uri, "--experiment_name", "glmops-bench-scaling"]
    # The GPU host's MLflow has no SQLAlchemy (no sqlite store), and MLflow 3 takes a file store only when asked.
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    t0 = time.time()
    # The job's log goes through as it comes (a run cut short still shows how far it got), and is kept for parsing.
    proc = subprocess.Popen(cmd + args.extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not args.quiet and "Warning" not in line:
            print(f"  [{workers} GPU] {line}", end="", flush=True)
    proc.wait()
    out = "".join(lines)
    steps = STEPS_LINE.search(out)
    peak = PEAK_LINE.search(out)
    if proc.returncode != 0 or not steps:
        return {"workers": workers, "error": out[-4000:]}
    lines = [ln for ln in out.splitlines() if "train  [" in ln or "gradient checkpointing:" in ln]
    return {"workers": workers, "tokens_per_s": int(steps.group(1).replace(",", "")),
            "peak_gib": float(peak.group(1)) if peak else None, "wall_s": round(time.time() - t0),
            "log": lines[-8:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/glmops-bench")
    ap.add_argument("--tokenizer", required=True, help="the family's tokenizer (ChatGLM2's tokenizer.model, "
                                                       "ChatGLM-6B's ice_text.model)")
    ap.add_argument("--family", default="chatglm2", choices=["chatglm2", "chatglm"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--mlflow_tracking_uri", default=None)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (one GPU each), run in order")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true", help="do not echo the jobs' logs")
    ap.add_argument("extra", nargs="*", help="more flags for jobs/finetune.py (after --)")
    args = ap.parse_args()
    args.mlflow_tracking_uri = args.mlflow_tracking_uri or f"file://{Path(args.workdir).resolve()}/mlruns"
    build_checkpoint(Path(args.workdir) / "model", args.tokenizer, smoke=False, family=args.family)
    data = Path(args.workdir) / "length-mix.json"
    data.write_text(json.dumps(make_records(args.records), ensure_ascii=False), encoding="utf-8")

    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rows.append(run_job(workers, args, data))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    ok = len(rows) > 1 and all("error" not in r for r in rows)
    ratio = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3) if ok else None
    print("\n| GPUs (Ray Train workers) | tokens/s (training steps) | peak GiB per worker |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r.get('tokens_per_s', 'failed')} | {r.get('peak_gib')} |")
    if ratio is not None:
        print(f"\nscaling 2 GPUs / 1 GPU: {ratio}")
    if args.out:
        import torch
        import transformers

        Path(args.out).write_text(json.dumps({"scaling_2gpu": ratio, "runs": rows, "steps": args.steps,
                                              "command": portable_command("train_scaling.py", args),
                                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                              "versions": {"torch": torch.__version__,
                                                           "transformers": transformers.__version__}}, indent=1))


if __name__ == "__main__":
    main()
