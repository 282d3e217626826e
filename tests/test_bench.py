"""The throughput benchmark itself runs (tiny model, CPU): both paths, same data, same objective."""

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
