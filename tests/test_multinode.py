"""The fine-tune job on a real multi-node Ray cluster (one machine): a head and two worker nodes, each its
own `ray start`, with one training worker per worker node, shared checkpoint storage, a worker node lost
mid-run and replaced, and the merge registering the result.

What one machine cannot show: separate hosts, a real network file system, GPUs. The nodes here share one
file system (standing in for NFS/S3 as `storage_path`) and talk over a private loopback (tests/ray_nodes.py).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from conftest import ROOT, run_job
from ray_nodes import MultiNodeCluster, namespaces_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not namespaces_available(),
                                 reason="needs Linux network namespaces (unshare --net) for a private cluster network")]

STEPS, EVAL_EVERY = 96, 12


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def _registered_checkpoints(run_dir) -> list[str]:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]


def test_a_job_spans_two_nodes_survives_losing_one_and_registers_its_model(tmp_path, tiny_model):
    from mlflow import MlflowClient

    records = [{"instruction": f"计算 {a} 加 {b}", "output": f"{a} 加 {b} 等于 {a + b}。"}
               for a in range(6) for b in range(6)]
    (tmp_path / "data.json").write_text(json.dumps(records, ensure_ascii=False))
    storage = tmp_path / "shared-storage"  # what an NFS mount or S3 bucket is on a real cluster
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cluster = MultiNodeCluster(tmp_path)
    try:
        cluster.start_head()
        cluster.add_worker_node("node-a")
        node_b = cluster.add_worker_node("node-b")
        job = cluster.run([sys.executable, "jobs/finetune.py", "--base_model", str(tiny_model), "--data_path",
                           str(tmp_path / "data.json"), "--eval_ratio", "0.2", "--bits", "4", "--lora_r", "8",
                           "--lora_dropout", "0", "--learning_rate", "5e-3", "--warmup_steps", "2",
                           "--max_steps", str(STEPS), "--eval_steps", str(EVAL_EVERY), "--logging_steps", "6",
                           "--max_tokens_per_batch", "128", "--gradient_accumulation_steps", "1",
                           "--max_source_length", "64", "--max_target_length", "64",
                           "--eval_generate_samples", "4", "--eval_max_new_tokens", "8",
                           "--num_workers", "2", "--cpus_per_worker", "1",
                           "--resources_per_worker", '{"trainer_slot": 1}',
                           "--output_dir", str(storage), "--run_name", "multi", "--mlflow_tracking_uri", uri,
                           "--experiment_name", "multinode"],
                          env={"PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}, timeout=900)
        # Wait until Ray Train has registered a checkpoint (its manager's snapshot on the shared storage lists
        # it): a checkpoint folder alone may not be known to the controller yet, and only known ones restore.
        _wait_for(lambda: _registered_checkpoints(storage / "multi"), 400, "no registered checkpoint")
        node_b.kill()  # the machine of rank 0 or 1 is gone, mid-run
        cluster.add_worker_node("node-c")  # and the cluster gets a replacement, as an autoscaler would do
        out, _ = job.communicate(timeout=600)
        (tmp_path / "job.log").write_text(out)
    finally:
        cluster.stop()
    assert job.returncode == 0, out[-4000:]

    # One training worker per worker node, then the restart lands on the replacement node.
    placements = re.findall(r"worker (\d)/2 on node ([0-9a-f]+)", out)
    first_pair = {node for _, node in placements[:2]}
    assert len(first_pair) == 2, placements
    assert {node for _, node in placements[2:]} - first_pair, placements
    resumed = re.search(r"resumed at step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= EVAL_EVERY and int(resumed.group(1)) % EVAL_EVERY == 0, out[-3000:]
    assert (storage / "multi" / f"checkpoint-{STEPS:06d}" / "adapter" / "adapter_model.safetensors").exists()

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # every step once: nothing lost, nothing logged twice

    merged = run_job("jobs/merge.py", "--run_id", run.info.run_id, "--mlflow_tracking_uri", uri,
                     "--output_dir", str(tmp_path / "merged"), "--registered_model", "multinode-chatglm2",
                     timeout=600)
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    version = client.get_model_version_by_alias("multinode-chatglm2", "champion")
    assert version.tags["training_run_id"] == run.info.run_id
