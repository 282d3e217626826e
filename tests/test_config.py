"""Job configs: seed flag spellings, YAML + flags, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_job

from common.config import FinetuneConfig, MergeConfig, ServeConfig, load_config, save_config
from common.errors import ConfigError


def test_seed_flags_are_accepted():
    cfg = load_config(FinetuneConfig, ["--base_model=THUDM/chatglm2-6b", "--output_path=out/", "--fp16", "False",
                                       "--local_files_only", "True", "--per_device_train_batch_size", "2",
                                       "--gradient_accumulation_steps", "8", "--bits", "8", "--save_steps", "20"],
                      "t", "t")
    assert (cfg.base_model, cfg.output_dir, cfg.fp16, cfg.local_files_only) == ("THUDM/chatglm2-6b", "out/", False, True)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.bits, cfg.eval_steps) == (2, 8, 8, 20)
    assert load_config(ServeConfig, ["--model_path", "models/x"], "t", "t").model == "models/x"
    assert load_config(MergeConfig, ["--lora_model", "a", "--output_dir", "m"], "t", "t").lora_model == "a"


def test_flags_override_the_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.001\nlora_r: 8\noutput_path: from-yaml\n")
    cfg = load_config(FinetuneConfig, ["--config", str(tmp_path / "c.yaml"), "--lora_r", "16"], "t", "t")
    assert (cfg.learning_rate, cfg.lora_r, cfg.output_dir) == (0.001, 16, "from-yaml")


def test_every_problem_is_reported_together(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rat: 0.1\nbits: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, ["--config", str(tmp_path / "c.yaml"), "--learning_rate", "-1",
                                     "--lora_dropout", "x", "--nope", "1", "--fp16", "--bf16"], "t", "t")
    text = str(err.value)
    for fragment in ("unknown key 'learning_rat' (did you mean 'learning_rate'?)", "bits: must be one of 4, 8, 16",
                     "learning_rate: must be > 0", "lora_dropout: expected a number", "unknown flag --nope",
                     "fp16 and bf16: choose one"):
        assert fragment in text
    assert len(err.value.problems) == 6


def test_bad_config_from_the_command_line_exits_2_without_traceback():
    proc = run_job("jobs/finetune.py", "--dry_run", "--bits", "5", "--learning_rate", "-0.1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 problem(s)" in proc.stderr


def test_merge_needs_exactly_one_adapter_source():
    with pytest.raises(ConfigError, match="exactly one of --run_id, --experiment or --lora_model"):
        load_config(MergeConfig, ["--run_id", "a", "--lora_model", "b"], "t", "t")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(FinetuneConfig, ["--lora_target", "q_proj,v_proj"], "t", "t")
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(FinetuneConfig, ["--config", str(path)], "t", "t")
    assert again == cfg and again.lora_target == ["q_proj", "v_proj"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path: Path):
    cls = {"finetune": FinetuneConfig, "merge": MergeConfig, "serve": ServeConfig}[path.stem.split("-")[0]]
    load_config(cls, ["--config", str(path)], "t", "t")


@pytest.mark.parametrize("value,message", [
    ("A100", "resources_per_worker: not valid JSON"),
    ('{"A100": 0}', "resources_per_worker: expected a JSON object of resource names to positive amounts"),
    ('{"GPU": 1}', "resources_per_worker: CPU and GPU are set by --cpus_per_worker and --use_gpu"),
])
def test_custom_worker_resources_are_checked_before_anything_starts(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, ["--resources_per_worker", value], "t", "t")
    assert message in str(err.value)
