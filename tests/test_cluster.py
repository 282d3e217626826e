"""Joining the cluster in RAY_ADDRESS: a wrong address is one line at once, and a hand-started driver's worker
settings reach its workers (common/cluster.py; the multi-node test joins a real cluster this way)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_job
from mlflow_server import free_port

from common.cluster import check_reachable, forwarded_env
from common.errors import UserError


def test_a_job_pointed_at_an_address_where_nothing_listens_says_so_at_once(tmp_path, tiny_model):
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "你好", "output": "你好！"}] * 8, ensure_ascii=False))
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_job("jobs/finetune.py", "--base_model", str(tiny_model), "--data_path", str(tmp_path / "data.json"),
                   "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                   "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env={"RAY_ADDRESS": address})
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: nothing answers at RAY_ADDRESS={address}" in proc.stderr
    assert "unset it to train on a local Ray" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 60, f"{took:.0f} s: Ray's own retries take minutes"  # generous: the job's imports on 2 cores


def test_a_dashboard_address_is_told_apart_from_the_cluster_address():
    with pytest.raises(UserError, match=r"job-submission \(dashboard\) address.*ray job submit --address"):
        check_reachable("http://127.0.0.1:8265")


def test_ray_client_and_auto_addresses_are_left_to_ray():
    check_reachable("ray://10.0.0.1:10001")  # no connection attempted: Ray's client reports its own errors
    check_reachable("auto")


def test_workers_get_our_settings_but_no_secret_and_no_machine_paths():
    env = {"GLMOPS_WINDOW_EXAMPLES": "4096", "GLMOPS_CACHE": "/shared/glmops", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "HF_HUB_OFFLINE": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "GLMOPS_API_KEY": "s3cret", "HF_TOKEN": "hf_x", "HF_HOME": "/home/me/hf", "PATH": "/usr/bin"}
    assert forwarded_env(env) == {"GLMOPS_WINDOW_EXAMPLES": "4096", "GLMOPS_CACHE": "/shared/glmops",
                                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1", "HF_HUB_OFFLINE": "1",
                                  "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
