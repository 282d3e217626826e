"""Large data through the real stack: Ray Data tokenizes, Ray Train workers read their share of the cache.

Marked slow: each case starts a local Ray (about 30-90 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT, run_job

from bench.make_large_data import write as write_large
from bench.process_memory import PeakRSS

pytestmark = pytest.mark.slow

# What one old-design process held: every record, then every encoded example, in Python lists.
OLD_DESIGN = """
import json, resource, sys
from common.data import load_dataset
from common.training.examples import encode_records
from common.models.loader import load_tokenizer, open_model_folder
from common.templates import get_template
info = open_model_folder(sys.argv[2]); tok = load_tokenizer(info)
ds = load_dataset(sys.argv[1])
enc = encode_records(ds.records, tok, get_template(info.template), 512, 512)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def finetune_args(model, data, out, *extra: str) -> list[str]:
    return ["jobs/finetune.py", "--base_model", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--mlflow_tracking_uri", f"sqlite:///{out}/mlflow.db", "--num_workers", "2", "--cpus_per_worker", "1",
            "--bits", "4", "--lora_r", "8", "--gradient_checkpointing", "false", "--logging_steps", "1",
            "--eval_generate_samples", "4", "--eval_max_new_tokens", "8", *extra]  # replies: test_finetune


def test_100k_records_train_on_two_workers_in_memory_bounded_by_the_window(tmp_path, tiny_model):
    data = write_large(tmp_path / "large.jsonl", 100_000, seed=1)
    # 512-token rows: on CPU, attention over a packed row builds a dense mask and scores (rows^2 floats per
    # head), which at the default 8192 would outweigh the data. Windows of 4,096 examples (one stored part):
    # what a worker holds of the data, whatever its size.
    cmd = [sys.executable, *finetune_args(tiny_model, data, tmp_path / "out", "--max_steps", "3", "--eval_steps", "3",
                                          "--max_eval_samples", "200", "--max_tokens_per_batch", "1024",
                                          "--max_source_length", "512", "--max_target_length", "512")]
    # The old design runs alongside (it reports its own peak; the job's tree is sampled apart): the two share
    # the machine's cores, and the suite does not wait for one after the other.
    old = subprocess.Popen([sys.executable, "-c", OLD_DESIGN, str(data), str(tiny_model)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", "GLMOPS_WINDOW_EXAMPLES": "4096"})
    with PeakRSS(proc.pid) as peaks:
        out, _ = proc.communicate(timeout=900)
    old_out, old_err = old.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "with Ray Data" in out and "step 3/3" in out
    assert old.returncode == 0, old_err[-2000:]
    old_gib = float(old_out.split()[-1])
    worker, driver = peaks.peak_of("ray::RayTrainWorker"), peaks.peak_of("python jobs/finetune.py")
    print(f"old design, one process: {old_gib:.2f} GiB; ours: {peaks.table()[:6]}")
    # The old design held all of this in the driver, the Train controller and again in every worker.
    assert 0 < worker < old_gib and 0 < driver < old_gib, (old_gib, peaks.table()[:8])
    assert peaks.table()[0][0] < old_gib


def test_every_example_is_trained_once_per_epoch_across_workers_in_the_same_order_twice(tmp_path, tiny_model):
    records = [{"instruction": f"问题 {i}：" + "字" * (i % 11), "output": f"回答 {i}。" + "好" * (i % 7)}
               for i in range(300)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records, ensure_ascii=False))

    def run(log_dir):
        log_dir.mkdir()
        args = finetune_args(tiny_model, data, tmp_path / "out", "--num_train_epochs", "2", "--eval_ratio", "0.1",
                             "--max_tokens_per_batch", "512", "--max_source_length", "128", "--max_target_length",
                             "128", "--gradient_accumulation_steps", "3", "--eval_steps", "1000")
        proc = run_job(*args, env={"RAY_ADDRESS": "", "GLMOPS_DATA_CHUNK_RECORDS": "40",
                                   "GLMOPS_TEST_EXAMPLE_LOG": str(log_dir)}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logs = {r: [json.loads(x) for x in (log_dir / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
        return proc, logs

    first, logs = run(tmp_path / "a")
    assert "with Ray Data" in first.stdout  # 300 records in chunks of 40
    train_ids = None
    for epoch in (0, 1):
        ids = {r: [i for e in logs[r] if e["epoch"] == epoch for i in e["ids"]] for r in (0, 1)}
        assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
        seen = Counter(ids[0] + ids[1])
        assert max(seen.values()) == 1
        train_ids = train_ids or set(seen)
        assert set(seen) == train_ids and len(train_ids) == 270  # 300 minus the 30 held out
    order = lambda lg, e: [i for r in (0, 1) for x in lg[r] if x["epoch"] == e for i in x["ids"]]  # noqa: E731
    assert order(logs, 0) != order(logs, 1)

    second, logs_again = run(tmp_path / "b")
    assert "data cache: using" in second.stdout and "with Ray Data" not in second.stdout
    assert logs_again == logs


def test_a_bad_record_deep_in_a_large_jsonl_file_is_named_with_its_line(tmp_path, tiny_model):
    path = write_large(tmp_path / "big.jsonl", 3000, seed=2, bad={2999})
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(10, "")  # one blank line: the record index and the line now differ by 2
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_job("jobs/finetune.py", "--dry_run", "--base_model", str(tiny_model), "--data_path", str(path),
                   "--output_dir", str(tmp_path / "out"), env={"RAY_ADDRESS": "", "GLMOPS_DATA_CHUNK_RECORDS": "500"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "with Ray Data" in proc.stdout
    assert f"{path}: 1 of 3000 record(s) are invalid" in proc.stderr
    assert f"{path}: record 2999 (line 3001), field 'output': expected a non-empty string" in proc.stderr
