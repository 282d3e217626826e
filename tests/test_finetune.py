"""jobs/finetune.py end to end on CPU: a real Ray cluster (`ray start --head`, shared by the session's jobs,
which join it through RAY_ADDRESS), 2 workers, a real MLflow server, 4-bit NF4.

Marked slow: each run trains for real (about 25-60 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_job
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

STEPS = 24
EVAL_EVERY = 6


def _records() -> list[dict]:
    base = [
        {"instruction": f"计算 {a} 加 {b}", "output": f"{a} 加 {b} 等于 {a + b}。"} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 8)]
    ] + [
        {"instruction": "Translate into Chinese.", "input": w, "output": z} for w, z in
        [("cat", "猫"), ("dog", "狗"), ("red", "红色"), ("tea", "茶")]
    ] + [
        {"instruction": "中国的首都是哪里？", "output": "北京。", "history": [["你好", "你好！"]]},
        {"instruction": "List two colors.", "output": "1. red\n2. blue"},
    ]
    return base * 4  # a small repeated set: the eval split overlaps training, so eval loss falls too


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, ray_head):
    root = tmp_path_factory.mktemp("ft")
    (root / "data.json").write_text(json.dumps(_records(), ensure_ascii=False))
    server = MlflowServer(root).start()
    yield {"root": root, "server": server, "model": tiny_model, "ray": ray_head}
    server.stop()


def finetune(env, run_name: str, *extra: str, hooks: dict | None = None, experiment: str = "ft-tests"):
    args = ["jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(env["root"] / "data.json"),
            "--eval_ratio", "0.25", "--bits", "4", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
            "--learning_rate", "1e-2", "--warmup_steps", "2", "--max_steps", str(STEPS), "--eval_steps",
            str(EVAL_EVERY), "--logging_steps", "3", "--max_tokens_per_batch", "128", "--gradient_accumulation_steps",
            "1", "--max_source_length", "64", "--max_target_length", "64", "--save_total_limit", "2",
            "--num_workers", "2", "--cpus_per_worker", "1", "--gradient_checkpointing", "false",
            "--system_metrics_interval", "1", "--eval_generate_samples", "6", "--eval_max_new_tokens", "16",
            "--output_dir", str(env["root"] / "runs"), "--run_name", run_name,
            "--mlflow_tracking_uri", env["server"].uri, "--experiment_name", experiment, *extra]
    # Chunks of 12 records: the 40-record set goes through the Ray Data pipeline, as large data does. The job
    # joins the session's cluster, its settings (these, the test hooks) forwarded to its workers.
    return run_job(*args, env={**env["ray"].join_env, "GLMOPS_DATA_CHUNK_RECORDS": "12", **(hooks or {})}, timeout=600)


def run_id_of(proc) -> str:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MLflow run id:"))
    return line.split()[3]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def uninterrupted(env):
    proc = finetune(env, "plain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_id_of(proc)


def test_loss_falls_and_everything_lands_in_mlflow(env, uninterrupted):
    from mlflow import MlflowClient

    proc, run_id = uninterrupted
    uri = env["server"].uri
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = [v for _, v in sorted(history(uri, run_id, "loss"))]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    evals = sorted(history(uri, run_id, "eval_loss"))
    assert [s for s, _ in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert evals[-1][1] < evals[0][1]
    assert {"learning_rate", "grad_norm", "tokens_per_second", "perplexity"} <= set(run.data.metrics)
    assert run.data.params["lora_r"] == "8" and run.data.params["bits"] == "4"
    for tag in ("base_model", "family", "dataset_hash", "dataset_size", "ray_run_name"):
        assert run.data.tags[tag]
    assert "step 24/24" in proc.stdout and "tok/s" in proc.stdout and "fine-tune finished" in proc.stdout
    assert "lora_r: 8" in (env["root"] / "runs" / "plain" / "config.yaml").read_text()  # saved with the checkpoints


def test_the_run_says_where_it_came_from(env, uninterrupted):
    """What the MLflow UI shows as Source, Datasets and System metrics (test_merge checks them in a browser)."""
    from mlflow import MlflowClient

    _, run_id = uninterrupted
    client = MlflowClient(env["server"].uri)
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs/finetune.py" and tags["glmops.version"]
    if (ROOT / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    train, held_out = inputs["training"], inputs["eval"]
    assert (train.name, train.digest) == ("data.json", tags["dataset_hash"])
    assert json.loads(train.profile)["num_rows"] == 40 and "instruction" in train.schema
    assert json.loads(held_out.profile)["num_rows"] == 10 and held_out.digest != train.digest
    assert json.loads(train.source)["uri"].endswith("data.json")
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    kind = client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"


def test_every_eval_scores_greedy_replies_and_logs_them_as_a_table(env, uninterrupted):
    from mlflow import MlflowClient

    proc, run_id = uninterrupted
    uri = env["server"].uri
    evals = [s for s, _ in sorted(history(uri, run_id, "eval_loss"))]
    for key in ("eval_bleu-4_chars", "eval_rouge-1_jieba", "eval_rouge-2_jieba", "eval_rouge-l_jieba",
                "eval_exact_match", "eval_reply_chars"):
        points = sorted(history(uri, run_id, key))
        assert [s for s, _ in points] == evals, key
        assert all(0 <= v <= (10**4 if key == "eval_reply_chars" else 100) for _, v in points)
    client = MlflowClient(uri)
    tables = sorted(a.path for a in client.list_artifacts(run_id, "eval_generations"))
    assert tables == [f"eval_generations/step-{s:06d}.json" for s in evals]
    table = json.loads(Path(client.download_artifacts(run_id, tables[-1])).read_text())
    assert set(table["columns"]) >= {"prompt", "reference", "reply", "rouge-l_jieba"} and len(table["data"]) == 6
    assert "best ROUGE-L:" in proc.stdout and "best BLEU-4:" in proc.stdout


def test_best_metric_rouge_l_keeps_the_checkpoint_with_the_highest_rouge_l(env):
    from mlflow import MlflowClient

    proc = finetune(env, "by-rouge", "--best_metric", "rouge-l")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id, uri = run_id_of(proc), env["server"].uri
    rouge = sorted(history(uri, run_id, "eval_rouge-l_jieba"))
    tags = MlflowClient(uri).get_run(run_id).data.tags
    meta = json.loads((Path(tags["best_checkpoint"]) / "adapter" / "glmops.json").read_text())
    assert tags["best_metric"] == "rouge-l"
    assert meta["eval_scores"]["eval_rouge-l_jieba"] == pytest.approx(max(v for _, v in rouge))
    assert dict(rouge)[meta["step"]] == pytest.approx(max(v for _, v in rouge))  # its step scored highest


def test_the_kept_best_checkpoint_has_the_lowest_eval_loss(env, uninterrupted):
    from mlflow import MlflowClient

    _, run_id = uninterrupted
    uri = env["server"].uri
    best_step, best_loss = min(history(uri, run_id, "eval_loss"), key=lambda sv: sv[1])
    best_path = Path(MlflowClient(uri).get_run(run_id).data.tags["best_checkpoint"])
    meta = json.loads((best_path / "adapter" / "glmops.json").read_text())
    assert meta["step"] == best_step and meta["eval_loss"] == pytest.approx(best_loss)
    kept = sorted((env["root"] / "runs" / "plain").glob("checkpoint-*"))
    assert len(kept) == 2 and best_path in kept


def test_the_adapter_artifact_downloads_and_loads_with_complete_metadata(env, uninterrupted, tmp_path):
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_id = uninterrupted
    path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                    tracking_uri=env["server"].uri, dst_path=str(tmp_path)))
    meta = json.loads((path / "glmops.json").read_text())
    for key in ("base_model", "revision", "family", "template", "lora", "bits", "dataset_hash", "step",
                "eval_loss", "mlflow_run_id"):
        assert key in meta, key
    assert meta["family"] == "chatglm2" and meta["bits"] == 4 and meta["lora"]["r"] == 8
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["model"]), path)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_resume_continues_from_step_k_with_the_same_losses(env, uninterrupted):
    _, plain_id = uninterrupted
    uri = env["server"].uri
    stopped = finetune(env, "stopped", hooks={"GLMOPS_TEST_STOP_AT_STEP": "12"})
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-2000:]
    ckpt = env["root"] / "runs" / "stopped" / "checkpoint-000012"
    assert ckpt.is_dir()
    resumed = finetune(env, "resumed", "--resume_from_checkpoint", str(ckpt))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "resumed at step 12" in resumed.stdout
    run_id = run_id_of(resumed)
    assert run_id == run_id_of(stopped)  # the resumed run continues the same MLflow run
    steps = [s for s, _ in history(uri, run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    plain = dict(history(uri, plain_id, "loss"))
    again = dict(history(uri, run_id, "loss"))
    for s in range(13, STEPS + 1):
        assert again[s] == pytest.approx(plain[s], abs=1e-3), s


def progress(stdout: str, after: int = 0) -> dict[int, list[float]]:
    """The progress lines of a run's log by step: the loss (and, for preference runs, reward accuracy and margin)
    over each `--logging_steps` window. A run resumed into the same MLflow run writes no step twice there, so
    resumed runs are compared with these."""
    import re

    line = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+)(?: \| reward accuracy ([\d.]+) \| margin ([-\d.]+))?")
    return {int(m[0]): [float(v) for v in m[1:] if v] for m in line.findall(stdout) if int(m[0]) > after}


def test_a_resumed_chatglm1_run_reproduces_the_uninterrupted_losses_on_the_packed_path(env):
    """ChatGLM-6B (THUDM's layout, the reference folder) trains in packed rows, and a run resumed from its step-6
    checkpoint gives the uninterrupted run's losses."""
    from conftest import reference_dir

    model = str(reference_dir("chatglm1"))
    glm1 = {**env, "model": model}
    plain = finetune(glm1, "glm1-plain", "--max_steps", "12", "--bits", "16", experiment="ft-chatglm1")
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-2000:]
    assert "micro-batches (rows of <= 128 tokens)" in plain.stdout  # packed
    ckpt = env["root"] / "runs" / "glm1-plain" / "checkpoint-000006"
    resumed = finetune(glm1, "glm1-resumed", "--max_steps", "12", "--bits", "16", "--resume_from_checkpoint",
                       str(ckpt), experiment="ft-chatglm1")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "resumed at step 6" in resumed.stdout
    before, again = progress(plain.stdout, after=6), progress(resumed.stdout)
    assert sorted(again) == [9, 12] and sorted(before) == sorted(again)
    for step, values in again.items():
        assert values == pytest.approx(before[step], abs=1e-3), step


def test_a_dead_worker_is_restored_from_the_last_checkpoint_and_nothing_is_logged_twice(env, uninterrupted, tmp_path):
    _, plain_id = uninterrupted
    uri = env["server"].uri
    proc = finetune(env, "crash", hooks={"GLMOPS_TEST_FAIL_AT_STEP": f"9:{tmp_path / 'failed-once'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (tmp_path / "failed-once").exists()
    assert "resumed at step 6" in proc.stdout
    run_id = run_id_of(proc)
    for key in ("loss", "eval_loss"):
        steps = [s for s, _ in history(uri, run_id, key)]
        assert len(steps) == len(set(steps)), key
    assert sorted(s for s, _ in history(uri, run_id, "loss")) == list(range(1, STEPS + 1))
    assert dict(history(uri, run_id, "loss"))[STEPS] == pytest.approx(dict(history(uri, plain_id, "loss"))[STEPS],
                                                                       abs=1e-3)


def test_a_small_file_trains_with_default_flags_and_its_loss_falls(env):
    """21 records and no batching flags: the job fits the batching to the data (instead of one optimizer step
    per epoch), warm-up is a share of the steps, and every resolved value is printed, saved and logged."""
    from mlflow import MlflowClient

    small = env["root"] / "small.json"
    small.write_text(json.dumps(_records()[:21], ensure_ascii=False))
    proc = run_job("jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(small),
                   "--output_dir", str(env["root"] / "runs"), "--run_name", "defaults",
                   "--mlflow_tracking_uri", env["server"].uri, "--experiment_name", "defaults",
                   env=env["ray"].join_env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("auto settings for this data:"))
    assert "--gradient_accumulation_steps 1" in line and "fewer than 10 optimizer steps per epoch" in line
    saved = (env["root"] / "runs" / "defaults" / "config.yaml").read_text()
    params = MlflowClient(env["server"].uri).get_run(run_id_of(proc)).data.params
    steps = 3 * 10  # 20 training examples make 10 rows of about two: 10 steps per epoch, 3 epochs
    assert f"step {steps}/{steps}" in proc.stdout
    for key, value in [("gradient_accumulation_steps", 1), ("warmup_steps", 1), ("logging_steps", 3)]:
        assert f"{key}: {value}\n" in saved and params[key] == str(value)
    assert int(params["max_tokens_per_batch"]) < 8192 and f"max_tokens_per_batch: {params['max_tokens_per_batch']}" in saved
    losses = [v for _, v in sorted(history(env["server"].uri, run_id_of(proc), "loss"))]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


@pytest.mark.parametrize("flags,expect", [
    (["--max_tokens_per_batch", "1024"], "--gradient_accumulation_steps 1"),  # the other one still adapts
    (["--max_tokens_per_batch", "8192", "--gradient_accumulation_steps", "8"],  # given, and cannot work: the error
     "the training data makes 1 micro-batch(es) per epoch, but one optimizer step takes 8"),
])
def test_given_batching_flags_are_never_overridden(env, flags, expect):
    small = env["root"] / "small-dry.json"
    small.write_text(json.dumps(_records()[:21], ensure_ascii=False))
    proc = run_job("jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(small), "--dry_run",
                   *flags, "--output_dir", str(env["root"] / "runs"))
    out = proc.stdout + proc.stderr
    assert expect in out and "Traceback" not in out
    if "1024" in flags:
        assert proc.returncode == 0 and "max_tokens_per_batch: 1024" in proc.stdout
    else:
        assert proc.returncode == 2 and "leave them unset" in proc.stderr


def test_bad_data_stops_before_any_worker_and_leaves_no_run(env):
    from mlflow import MlflowClient

    bad = env["root"] / "bad.json"
    bad.write_text('[{"instruction": "a", "output": ""}]')
    proc = run_job("jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(bad),
                   "--mlflow_tracking_uri", env["server"].uri, "--experiment_name", "bad-data")
    assert proc.returncode == 2 and "field 'output'" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert MlflowClient(env["server"].uri).get_experiment_by_name("bad-data") is None


def test_a_memory_kill_is_reported_with_the_node_memory_and_the_fixes(env):
    # Ray's own memory monitor, with its kill threshold lowered below what Ray alone uses: a real kill.
    proc = run_job("jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(env["root"] / "data.json"),
                   "--mlflow_tracking_uri", env["server"].uri, "--output_dir", str(env["root"] / "runs"),
                   "--max_failures", "0", "--experiment_name", "oom",
                   env={"RAY_ADDRESS": "", "RAY_memory_usage_threshold": "0.02"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.split("error: ", 1)[1]
    first, second = message.splitlines()[:2]
    assert "ran out of memory" in first and "GB used of its" in first and "Ray kills above 2%" in first
    assert "--num_workers 1" in first and "a smaller --max_tokens_per_batch (now " in first
    assert "continue with --resume_from_checkpoint" in second


def test_other_failures_are_not_taken_for_memory_kills():
    from common.errors import memory_kill

    try:
        raise RuntimeError("the worker failed") from ValueError("CUDA error: an illegal memory access")
    except RuntimeError as err:
        assert memory_kill(err) is None


@pytest.mark.parametrize("args,message", [
    (["--mlflow_tracking_uri", "http://127.0.0.1:9"], "is not reachable"),
    (["--base_model", "/nonexistent/model"], "no such folder"),
    (["--num_workers", str((os.cpu_count() or 2) + 1)], "CPUs; the cluster has"),
    (["--resources_per_worker", '{"A100": 1}'], "asks 1 'A100' per worker for 1 workers; the cluster has 0"),
])
def test_setup_errors_are_one_line_with_the_fix(env, args, message):
    base = ["jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(env["root"] / "data.json"),
            "--mlflow_tracking_uri", env["server"].uri, "--output_dir", str(env["root"] / "runs"),
            "--gradient_accumulation_steps", "1", "--max_tokens_per_batch", "128", "--max_source_length", "64",
            "--max_target_length", "64"]
    proc = run_job(*base, *args, env=env["ray"].join_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_ray_job_submit_runs_the_job_and_streams_its_log(env):
    import subprocess
    import sys
    import time

    head = env["ray"]
    ray = str(Path(sys.executable).with_name("ray"))
    runtime_env = {"env_vars": {"PATH": head.env["PATH"], "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                "HF_HUB_OFFLINE": "1", "GLMOPS_CACHE": os.environ["GLMOPS_CACHE"]}}
    cmd = [ray, "job", "submit", "--address", head.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/finetune.py", "--base_model", str(env["model"]), "--data_path",
           str(env["root"] / "data.json"), "--eval_ratio", "0.25", "--max_steps", "4", "--eval_steps", "2",
           "--logging_steps", "1", "--max_tokens_per_batch", "128", "--gradient_accumulation_steps", "1",
           "--eval_generate_samples", "4", "--eval_max_new_tokens", "8", "--num_workers", "2", "--cpus_per_worker",
           "1", "--max_source_length", "64", "--max_target_length", "64", "--lora_r", "4", "--gradient_checkpointing",
           "false", "--output_dir", str(env["root"] / "job-runs"), "--mlflow_tracking_uri", env["server"].uri,
           "--experiment_name", "job-submit"]
    for _ in range(30):  # the job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(2)
    assert proc.returncode == 0, out[-4000:]
    assert "step 4/4" in out and "fine-tune finished" in out and "succeeded" in out


def test_batching_follows_the_card_and_a_resumed_run_keeps_the_checkpoints(tiny_model, tmp_path, capsys):
    """Left unset, the batching starts from the large-data values for the workers' card (16384-token rows x 4
    where they fit without recomputation) before fitting them to the data; a run resumed from a checkpoint
    keeps the batching written into it, on whatever card it resumes."""
    from common.config import FinetuneConfig, load_config
    from jobs.finetune import fit_to_data, prepare_data

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--output_dir", str(tmp_path)], "t", "t")
    data = prepare_data(cfg, start_ray=lambda: None)
    resolved, auto = fit_to_data(cfg, data, gpu_bytes=140 * 2**30)
    assert "the large-data 16384 tokens x 4 would make fewer than 10 optimizer steps" in capsys.readouterr().out
    assert {"max_tokens_per_batch", "gradient_accumulation_steps"} <= set(auto)
    fit_to_data(cfg, data, gpu_bytes=None)
    assert "the large-data 8192 tokens x 8 would make" in capsys.readouterr().out
    resumed, auto = fit_to_data(cfg, data, gpu_bytes=140 * 2**30,
                                resumed={"max_tokens_per_batch": 512, "gradient_accumulation_steps": 2})
    assert (resumed.max_tokens_per_batch, resumed.gradient_accumulation_steps) == (512, 2)
    assert not {"max_tokens_per_batch", "gradient_accumulation_steps"} & set(auto)
    assert (resolved.max_tokens_per_batch, resolved.gradient_accumulation_steps) != (512, 2)


# -- preference tuning (--stage dpo) -------------------------------------------------------------------------

def dpo(env, run_name: str, sft_run_id: str, *extra: str):
    """DPO (the sigmoid loss) on the bundled pairs, starting from the SFT run's adapter, which is also the
    reference; 2 workers, 4-bit."""
    return finetune(env, run_name, "--stage", "dpo", "--data_path", str(ROOT / "data/preference.json"),
                    "--init_adapter", f"runs:/{sft_run_id}", "--eval_ratio", "0.1", "--learning_rate", "5e-3",
                    "--max_tokens_per_batch", "512", *extra, experiment="ft-dpo")


@pytest.fixture(scope="module")
def dpo_run(env, uninterrupted):
    """Every checkpoint kept, so one of them can be resumed from."""
    proc = dpo(env, "dpo", uninterrupted[1], "--best_metric", "eval_rewards_accuracy", "--save_total_limit", "5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_id_of(proc)


def test_dpo_learns_the_bundled_preferences_and_logs_its_rewards(env, dpo_run):
    from mlflow import MlflowClient

    proc, run_id = dpo_run
    uri = env["server"].uri
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["glmops.stage"] == "dpo"
    assert run.data.tags["best_metric"] == "eval_rewards_accuracy"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert [s for s, _ in sorted(history(uri, run_id, key))] == list(range(1, STEPS + 1)), key
    accuracy = sorted(history(uri, run_id, "eval_rewards_accuracy"))
    margins = sorted(history(uri, run_id, "eval_rewards_margins"))
    assert [s for s, _ in accuracy] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    # held-out pairs (24 of them): the chosen answers win, by a positive margin
    assert accuracy[-1][1] >= 0.9 and margins[-1][1] > 0, (accuracy, margins)
    losses = [v for _, v in sorted(history(uri, run_id, "loss"))]
    assert losses[0] == pytest.approx(math.log(2), abs=0.02)  # policy = reference at the start
    assert "starting from the adapter" in proc.stdout and "(also the reference policy)" in proc.stdout
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    assert "reward accuracy" in proc.stdout and "best reward acc.:" in proc.stdout
    # after the first epoch, every training pair's reference is known: both workers' halves, shared
    kept = re.search(r"reference log-probabilities kept for (\d+) more pairs \((\d+) in all\)", proc.stdout)
    assert kept and int(kept[1]) == int(kept[2]) == int(re.search(r"data: (\d+) training examples", proc.stdout)[1])
    meta = json.loads(next((env["root"] / "runs" / "dpo").glob("checkpoint-*/adapter/glmops.json")).read_text())
    assert meta["stage"] == "dpo" and meta["preference"]["loss"] == "sigmoid"
    assert meta["init_adapter"].startswith("runs:/") and meta["lora"]["r"] == 8


def test_a_resumed_dpo_run_reproduces_the_losses(env, uninterrupted, dpo_run):
    first, run_id = dpo_run
    ckpt = env["root"] / "runs" / "dpo" / "checkpoint-000012"
    resumed = dpo(env, "dpo-resumed", uninterrupted[1], "--resume_from_checkpoint", str(ckpt))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "resumed at step 12" in resumed.stdout and run_id_of(resumed) == run_id
    before, again = progress(first.stdout, after=12), progress(resumed.stdout)  # loss, reward accuracy, margin
    assert sorted(again) == [15, 18, 21, 24] and sorted(before) == sorted(again)
    for step, values in again.items():
        assert len(values) == 3 and values == pytest.approx(before[step], abs=2e-3), step


def test_the_merged_dpo_model_is_registered_with_its_stage(env, dpo_run, tmp_path):
    from mlflow import MlflowClient

    _, run_id = dpo_run
    out = tmp_path / "merged"
    proc = run_job("jobs/merge.py", "--mlflow_tracking_uri", env["server"].uri, "--run_id", run_id,
                   "--registered_model", "tiny-dpo", "--output_dir", str(out), "--dtype", "fp32", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    version = MlflowClient(env["server"].uri).get_model_version_by_alias("tiny-dpo", "champion")
    assert version.tags["glmops.stage"] == "dpo" and version.tags["training_run_id"] == run_id
    lineage = json.loads((out / "glmops.json").read_text())["lineage"]
    assert lineage["stage"] == "dpo" and lineage["preference"]["loss"] == "sigmoid"
    assert not (next((env["root"] / "runs" / "dpo").glob("checkpoint-*/adapter")) / "reference").exists()
