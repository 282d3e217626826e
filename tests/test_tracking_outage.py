"""The training side of staying up: an MLflow tracking server that goes down in the middle of a fine-tune and
comes back on the same store neither fails the run nor loses or repeats a metric.

The end-to-end test is marked slow: a real `mlflow server` (killed with SIGKILL, started again on the same port and store), a real
local Ray, the job as a user runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from mlflow_server import MlflowServer
from test_finetune import _records

STEPS, EVAL_EVERY, OUTAGE_S = 24, 6, 30


def _loss_steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def _run_id(uri: str, experiment: str) -> str | None:
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    runs = MlflowClient(uri).search_runs([exp.experiment_id]) if exp else []
    return runs[0].info.run_id if runs else None


@pytest.mark.slow
def test_a_tracking_server_down_for_30_s_mid_run_loses_and_repeats_nothing(tmp_path, tiny_model):
    import json

    (tmp_path / "data.json").write_text(json.dumps(_records(), ensure_ascii=False))
    server = MlflowServer(tmp_path).start()
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(
        [sys.executable, "jobs/finetune.py", "--base_model", str(tiny_model), "--data_path", str(tmp_path / "data.json"),
         "--eval_ratio", "0.25", "--bits", "4", "--lora_r", "8", "--lora_dropout", "0", "--max_steps", str(STEPS),
         "--eval_steps", str(EVAL_EVERY), "--logging_steps", "1", "--max_tokens_per_batch", "128",
         "--gradient_accumulation_steps", "1", "--max_source_length", "64", "--max_target_length", "64",
         "--num_workers", "1", "--cpus_per_worker", "1", "--gradient_checkpointing", "false",
         "--system_metrics_interval", "1", "--eval_generate_samples", "2", "--eval_max_new_tokens", "8",
         "--output_dir", str(tmp_path / "runs"), "--run_name", "outage", "--mlflow_tracking_uri", server.uri,
         "--experiment_name", "outage"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_ADDRESS": "", "GLMOPS_DATA_CHUNK_RECORDS": "12",
             # MLflow's client retries a call for about 2 minutes by itself; an outage longer than that is what
             # the job must survive, so the test leaves the client one retry and a 30 s outage outlasts it.
             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
    restarted = threading.Event()
    try:
        run_id = None
        deadline = time.time() + 400
        while time.time() < deadline and job.poll() is None:  # wait for the first flushed steps
            run_id = run_id or _run_id(server.uri, "outage")
            if run_id and _loss_steps(server.uri, run_id):
                break
            time.sleep(0.2)
        assert run_id and job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        seen_before = _loss_steps(server.uri, run_id)
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server crashes mid-run
        server.proc.wait(timeout=30)

        def restart():
            time.sleep(OUTAGE_S)
            server.start()  # same port, same SQLite store and artifact root
            restarted.set()

        threading.Thread(target=restart, daemon=True).start()
        assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-4000:]
        assert restarted.is_set()
        text = (tmp_path / "job.log").read_text()
        assert "MLflow" in text and "retrying" in text  # the job said it waited for the server
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = _loss_steps(server.uri, run_id)
        assert steps == list(range(1, STEPS + 1)), (seen_before, steps)  # every step exactly once
        evals = sorted(m.step for m in client.get_metric_history(run_id, "eval_loss"))
        assert evals == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
        assert len(seen_before) < STEPS  # the outage fell inside the run, not after it
    finally:
        if job.poll() is None:
            job.kill()
        server.stop()


# -- the retry rule, without a server ------------------------------------------------------------------------

def test_retrying_waits_out_an_unreachable_server_and_says_so(monkeypatch):
    from common import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    said, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError(111, "Connection refused")
        return "written"

    assert tracking.retrying("logging steps 1-6", flaky, log=lambda m, **k: said.append(m)) == "written"
    assert len(calls) == 4 and len(said) == 2  # once when it went away, once when it came back
    assert "unreachable while logging steps 1-6" in said[0] and "is back" in said[1]


def test_retrying_raises_at_once_for_a_refused_request_and_after_its_patience_for_an_outage(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from common import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)

    def refused():
        raise MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        tracking.retrying("x", refused, patience_s=5, log=lambda *a, **k: None)
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        tracking.retrying("x", down, patience_s=0.0, log=lambda *a, **k: None)
    assert len(calls) == 1


def test_a_job_that_loses_the_race_to_create_its_experiment_joins_the_winners(tmp_path):
    """Two jobs started together on a new experiment both find it missing and both create it; the second create
    fails in MLflow, and that job must take the experiment the first one made instead of stopping."""
    from mlflow import MlflowClient

    from common.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class LateClient(MlflowClient):  # looked before the other job created it
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    winner = experiment_id(MlflowClient(uri), "adapters", uri)
    assert experiment_id(LateClient(uri), "adapters", uri) == winner
    assert experiment_id(MlflowClient(uri), "adapters", uri) == winner
    assert [e.name for e in MlflowClient(uri).search_experiments()].count("adapters") == 1
