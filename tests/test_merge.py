"""jobs/merge.py: merge the best adapter, verify it, register a new version under an alias (real MLflow server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_job
from mlflow_server import MlflowServer
from test_finetune import _records, finetune, run_id_of

pytestmark = pytest.mark.slow

NAME = "tiny-merge-tests"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, ray_head):
    root = tmp_path_factory.mktemp("merge")
    (root / "data.json").write_text(json.dumps(_records(), ensure_ascii=False))
    server = MlflowServer(root).start()
    env = {"root": root, "server": server, "model": tiny_model, "ray": ray_head}
    proc = finetune(env, "to-merge", experiment="merge-tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    env["run_id"] = run_id_of(proc)
    yield env
    server.stop()


def merge(env, *args: str):
    return run_job("jobs/merge.py", "--mlflow_tracking_uri", env["server"].uri, "--registered_model", NAME,
                   "--dtype", "fp32", *args, timeout=600)


def versions(env) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient(env["server"].uri).search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def merged_three_ways(trained):
    root = trained["root"]
    by_run = merge(trained, "--run_id", trained["run_id"], "--output_dir", str(root / "m-run"))
    assert by_run.returncode == 0, by_run.stdout[-3000:] + by_run.stderr[-3000:]
    by_exp = merge(trained, "--experiment", "merge-tests", "--output_dir", str(root / "m-exp"),
                   "--merge_base", "nf4_roundtrip")
    assert by_exp.returncode == 0, by_exp.stderr[-3000:]
    by_path = merge(trained, "--lora_model", str(_best_checkpoint(trained)), "--output_dir", str(root / "m-path"))
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    return by_run, by_exp, by_path


def _best_checkpoint(env) -> Path:
    from mlflow import MlflowClient

    return Path(MlflowClient(env["server"].uri).get_run(env["run_id"]).data.tags["best_checkpoint"]) / "adapter"


def test_three_ways_to_choose_give_versions_1_to_3_with_the_alias_on_the_newest(trained, merged_three_ways):
    from mlflow import MlflowClient

    vs = versions(trained)
    assert [v.version for v in vs] == ["1", "2", "3"]
    alias = MlflowClient(trained["server"].uri).get_model_version_by_alias(NAME, "champion")
    assert alias.version == "3"
    for v in vs:
        assert v.tags["training_run_id"] == trained["run_id"]
        for tag in ("dataset_hash", "eval_loss", "base_model", "base_revision", "family", "merge_base"):
            assert tag in v.tags, tag
    assert vs[1].tags["merge_base"] == "nf4_roundtrip" and vs[0].tags["merge_base"] == "original"


def test_the_training_run_points_to_the_versions_made_from_it(trained, merged_three_ways):
    from mlflow import MlflowClient

    tags = MlflowClient(trained["server"].uri).get_run(trained["run_id"]).data.tags
    assert tags["glmops.model_version"] == f"{NAME}/3"
    for v in ("1", "2", "3"):
        assert f"[{NAME} version {v}](#/models/{NAME}/versions/{v})" in tags["mlflow.note.content"]


def test_merge_scores_the_merged_model_on_the_runs_eval_conversations(trained, merged_three_ways):
    tags = versions(trained)[0].tags
    for key in ("eval.bleu-4_chars", "eval.rouge-l_jieba", "eval.exact_match"):
        assert 0 <= float(tags[key]) <= 100, key
    assert "scored on the run's 6 eval conversations" in merged_three_ways[0].stdout


def test_evaluate_compares_base_registered_and_run_side_by_side_in_one_mlflow_run(trained, merged_three_ways):
    """Base vs fine-tuned on the training data: the fine-tuned ones (the registry version and the run's
    adapter on its base, unmerged) reply better; one run holds all three; the version gets its scores."""
    from mlflow import MlflowClient

    uri = trained["server"].uri
    specs = [str(trained["model"]), f"models:/{NAME}/1", trained["run_id"]]
    proc = run_job("jobs/evaluate.py", "--compare", ",".join(specs), "--data_path", str(trained["root"] / "data.json"),
                   "--max_samples", "12", "--max_new_tokens", "16", "--mlflow_tracking_uri", uri, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("  ")[0].strip(): line.split()[-6:] for line in proc.stdout.splitlines()
            if line.startswith(("tiny-chatglm2 ", f"{NAME} v1", "run "))}
    assert len(rows) == 3, proc.stdout[-2000:]
    rouge_l = {k: float(v[3]) for k, v in rows.items()}
    base = rouge_l["tiny-chatglm2"]
    assert rouge_l[f"{NAME} v1"] > base and rouge_l[f"run {trained['run_id'][:8]}"] > base, rouge_l
    client = MlflowClient(uri)
    run_id = next(x for x in proc.stdout.splitlines() if x.startswith("MLflow run id:")).split()[3]
    run = client.get_run(run_id)
    assert run.data.metrics[f"{NAME} v1/rouge-l_jieba"] == pytest.approx(rouge_l[f"{NAME} v1"], abs=0.01)
    assert run.data.tags[f"model_version [{NAME} v1]"] == f"{NAME}/1"
    assert run.data.tags[f"training_run_id [run {trained['run_id'][:8]}]"] == trained["run_id"]
    table = json.loads(Path(client.download_artifacts(run_id, "eval_generations.json")).read_text())
    assert len(table["data"]) == 12 and sum(c.startswith("reply [") for c in table["columns"]) == 3
    version = client.get_model_version(NAME, "1")
    assert version.tags["eval.run_id"] == run_id
    assert float(version.tags["eval.rouge-l_jieba"]) == pytest.approx(rouge_l[f"{NAME} v1"], abs=0.01)


def test_evaluate_names_the_bad_record_and_field(trained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "hi", "output": "ok"}, {"instruction": 3, "output": "x"}]')
    proc = run_job("jobs/evaluate.py", "--model", str(trained["model"]), "--data_path", str(bad),
                   "--mlflow_tracking_uri", trained["server"].uri)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.json" in proc.stderr and "record 1" in proc.stderr and "'instruction'" in proc.stderr, proc.stderr
    assert "--skip_invalid_records" not in proc.stderr  # a fine-tune flag: evaluate has none


CHROMIUM = "/usr/bin/chromium"


def test_the_mlflow_ui_shows_source_datasets_system_metrics_and_the_model_version(trained, merged_three_ways,
                                                                                  tmp_path):
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (.ci/run installs Debian's chromium)")
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    uri, run_id = trained["server"].uri, trained["run_id"]
    exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"{uri}/#/experiments/{exp_id}/runs/{run_id}", wait_until="load")
            page.get_by_text("jobs/finetune.py").first.wait_for(timeout=60_000)  # Source
            page.get_by_text("data.json").first.wait_for(timeout=30_000)         # Datasets
            page.get_by_text(f"{NAME} version 3").first.wait_for(timeout=30_000)  # the description's link
            page.screenshot(path=str(tmp_path / "run-overview.png"), full_page=True)
            page.goto(f"{uri}/#/experiments/{exp_id}/runs/{run_id}/system-metrics", wait_until="load")
            page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=60_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # a drawn chart, not a spinner
            page.screenshot(path=str(tmp_path / "run-system-metrics.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshots: {tmp_path}")


def test_both_merge_bases_are_compared_with_the_trained_model(merged_three_ways):
    out = merged_three_ways[0].stdout
    assert "merge_base=original" in out and "merge_base=nf4_roundtrip" in out
    diffs = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
             if line.strip().startswith("merge_base=")}
    # Merging into the NF4 round-tripped base is closer to what was trained (stack-notes §1.2).
    assert diffs["merge_base=nf4_roundtrip"] < diffs["merge_base=original"]


def test_the_registered_model_loads_with_plain_transformers_and_generates_like_the_adapter(
        trained, merged_three_ways, tmp_path):
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import Conversation
    from common.templates import get_template

    mlflow.set_tracking_uri(trained["server"].uri)
    path = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path)))
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    meta = json.loads((path / "glmops.json").read_text())
    assert meta["template"] == "chatglm2" and meta["lineage"]["training_run_id"] == trained["run_id"]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32),
                                        _best_checkpoint(trained)).eval()
    ids = torch.tensor([get_template("chatglm2").prompt(tok, Conversation(history=[], query="计算 1 加 2"))])
    a = merged.generate(ids, max_new_tokens=12, do_sample=False)
    b = adapter.generate(ids, max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist()


def _unchanged_registry(trained, proc, message: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_inputs_are_clear_and_leave_the_registry_unchanged(trained, merged_three_ways, tmp_path):
    from mlflow import MlflowClient

    before = [v.version for v in versions(trained)]
    client = MlflowClient(trained["server"].uri)
    _unchanged_registry(trained, merge(trained, "--run_id", "0123456789abcdef"), "no such run")
    empty = client.create_run(client.get_experiment_by_name("merge-tests").experiment_id).info.run_id
    client.set_terminated(empty)
    _unchanged_registry(trained, merge(trained, "--run_id", empty), "has no adapter artifact")
    moved = tmp_path / "adapter"
    shutil.copytree(_best_checkpoint(trained), moved)
    meta = json.loads((moved / "glmops.json").read_text())
    meta["base_model"] = str(tmp_path / "gone-base")
    (moved / "glmops.json").write_text(json.dumps(meta))
    _unchanged_registry(trained, merge(trained, "--lora_model", str(moved), "--output_dir", str(tmp_path / "o")),
                        "the adapter's base model cannot be found")
    _unchanged_registry(trained, merge(trained, "--run_id", trained["run_id"], "--output_dir",
                                       str(trained["root"] / "m-run")), "exists and is not empty")
    proc = run_job("jobs/merge.py", "--mlflow_tracking_uri", "http://127.0.0.1:9", "--run_id", trained["run_id"])
    _unchanged_registry(trained, proc, "is not reachable")
    assert [v.version for v in versions(trained)] == before


def test_an_adapter_only_version_holds_the_adapter_and_what_it_needs_and_equals_the_merged_model(
        trained, merged_three_ways, tmp_path):
    """--adapter_only registers a few-MB version under its own name: the adapter (safetensors) and glmops.json
    naming its base, the base's content hash, family, template, bits and LoRA config; on its base it gives the
    merged version's logits. Loaded as a model on its own, it says what it is."""
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.errors import UserError
    from common.merging import content_hash
    from common.registry import local_model_folder

    out = trained["root"] / "a-run"
    proc = run_job("jobs/merge.py", "--mlflow_tracking_uri", trained["server"].uri, "--run_id", trained["run_id"],
                   "--adapter_only", "--registered_model", "tiny-adapter-tests", "--output_dir", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adapter registered" in proc.stdout
    client = MlflowClient(trained["server"].uri)
    version = client.get_model_version_by_alias("tiny-adapter-tests", "champion")
    assert version.tags["glmops.kind"] == "adapter" and version.tags["training_run_id"] == trained["run_id"]
    assert version.tags["base_hash"] == content_hash(trained["model"]) and version.tags["lora_r"] == "8"
    assert "eval.rouge-l_jieba" in version.tags
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "glmops.json"} <= set(files)
    assert "model.safetensors" not in files and sum(files.values()) < 2**20
    meta = json.loads((out / "glmops.json").read_text())
    assert meta["kind"] == "adapter" and meta["base_model"] == str(trained["model"]) and meta["bits"] == 4
    assert meta["family"] == "chatglm2" and meta["template"] == "chatglm2" and meta["lora"]["r"] == 8

    ids = torch.tensor([[64, 65, 66, 67, 68, 69]])
    base = AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(trained["root"] / "m-run", dtype=torch.float32).eval()(
            input_ids=ids).logits
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="adapter-only version"):
        local_model_folder("models:/tiny-adapter-tests@champion", trained["server"].uri)
