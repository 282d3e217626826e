"""The benchmarks themselves run (tiny model, CPU): training's both paths on the same data and objective, the
serving benchmark's engine-alone timings for each decode_gemv setting."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_training_benchmark_runs_both_paths_on_the_same_objective(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/train_throughput.py"), "--smoke", "--workdir",
                           str(tmp_path / "work"), "--paths", "baseline,ours", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| baseline |" in proc.stdout and "| ours |" in proc.stdout
    result = json.loads(out.read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert result["baseline"]["tokens_per_s"] > 0 and result["ours"]["tokens_per_s"] > 0
    assert runs["ours"]["timed_tokens"] == runs["baseline"]["timed_tokens"]  # the same examples, pads excluded
    assert len(runs["ours"]["losses"]) == len(runs["baseline"]["losses"]) == result["steps"]
    # Same objective: the first step (identical adapters, no update yet) agrees closely; later ones stay near.
    assert abs(runs["ours"]["losses"][0] - runs["baseline"]["losses"][0]) < 0.02
    assert runs["ours"]["loss_vs_seed"]["max_abs"] < 0.1


def test_every_lever_is_a_valid_setting_of_our_path(tmp_path):
    """Each `--levers` row changes what it names and nothing else (a setting may override the benchmark's own)."""
    from bench import train_throughput as tt

    plain = tt.our_cfg(tmp_path, {})
    for name, settings in {**tt.PATHS, **tt.LEVERS}.items():
        cfg = tt.our_cfg(tmp_path, settings)
        for key, value in settings.items():
            if hasattr(cfg, key):
                assert getattr(cfg, key) == value, (name, key)
        assert (cfg.lora_r == plain.lora_r or "lora_r" in settings) and cfg.base_model == plain.base_model, name


def test_the_serving_benchmark_times_the_engine_alone_for_each_decode_gemv_setting(tmp_path, tiny_model):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/serve_throughput.py"), "--model", str(tiny_model),
                           "--device", "cpu", "--workdir", str(tmp_path / "work"), "--engine_only", "1,4",
                           "--engine_gemv", "auto,off", "--paths", "", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [r for r in json.loads(out.read_text())["servers"]["engine_alone"] if "batch" in r]
    assert [(r["decode_gemv"], r["batch"]) for r in steps] == [("auto", 1), ("auto", 4), ("off", 1), ("off", 4)]
    assert all(r["ms_per_step"] > 0 and r["tok_s"] > 0 for r in steps)
