"""Every deployment file under infra/ (and serving/deploy.yaml) parses and holds what the project relies on."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from common.config import FinetuneConfig, MergeConfig, load_config

KUBERAY = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
RAY_VERSION = "2.60.0"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _containers(cluster: dict):
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield from group["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_files_pin_ray_and_the_image(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayService", "RayCluster")
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == RAY_VERSION
    for c in _containers(cluster):
        assert c["image"].endswith(f"ray{RAY_VERSION}-cu128") and ":latest" not in c["image"]
        assert c["resources"]["limits"] == c["resources"]["requests"]  # guaranteed QoS: no surprise evictions
    for group in cluster.get("workerGroupSpecs") or []:
        for c in group["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one GPU per Ray Train worker


def test_rayjobs_run_our_jobs_with_flags_they_accept():
    for name, cls, script in (("rayjob-finetune.yaml", FinetuneConfig, "jobs/finetune.py"),
                              ("rayjob-merge.yaml", MergeConfig, "jobs/merge.py")):
        doc = _load(ROOT / "infra" / "kuberay" / name)
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", script]
        cfg = load_config(cls, argv[2:], "t", "t")  # raises on any unknown flag or bad value
        assert cfg is not None
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
        assert env["MLFLOW_TRACKING_URI"].startswith("http")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_and_serve_config_deploy_our_app_with_valid_args():
    from serving import AppArgs

    docs = [yaml.safe_load(_load(ROOT / "infra" / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"]),
            _load(ROOT / "serving" / "deploy.yaml")]
    for serve_cfg in docs:
        (app,) = serve_cfg["applications"]
        assert app["import_path"] == "serving:app"
        args = AppArgs(**app["args"])  # pydantic: unknown types fail here
        assert args.model.startswith("models:/") and args.model.endswith("@champion")


def test_ray_cluster_launcher_installs_the_project_and_has_gpu_workers():
    doc = _load(ROOT / "infra" / "ray" / "cluster.yaml")
    assert doc["head_node_type"] in doc["available_node_types"]
    gpu = [t for t in doc["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    setup = " ".join(doc["setup_commands"])
    assert "pip install -q -e ~/glmops" in setup and "MLFLOW_TRACKING_URI" in setup
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in doc["worker_start_ray_commands"])


def test_mlflow_server_script_needs_its_settings_and_binds_loopback_by_default():
    import subprocess

    script = ROOT / "infra" / "mlflow" / "start-server.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "MLFLOW_DB" in proc.stderr
    assert 'HOST="${MLFLOW_HOST:-127.0.0.1}"' in script.read_text()
