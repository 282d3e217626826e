"""Experiment tracking behind a small interface, with a do-nothing twin for ranks other than 0.

Step metrics are buffered and written when a checkpoint is kept: if a worker dies, Ray restores the
last checkpoint and the steps after it run again; since only steps up to a kept checkpoint were ever
written, nothing is logged twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.config import PROJECT_ROOT
from common.errors import UserError


def default_tracking_uri(explicit: str | None) -> str:
    """--mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else an SQLite store in the project folder."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}" if (Path.cwd() / "jobs").is_dir() else \
        f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to an SQLite store (never the process's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(uri: str) -> None:
    """Fail early, in one line, when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except Exception as err:  # noqa: BLE001 - any failure means the same to the user
        raise UserError(f"MLflow tracking server {uri} is not reachable ({type(err).__name__}). Start it "
                        "(`make mlflow-ui` or infra/mlflow/) or pass --mlflow_tracking_uri.") from None


class Tracker:
    """Writes to one MLflow run (created by the driver) from rank 0 of the workers."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self._pending: list[tuple[str, float, int]] = []
        # Steps already written (an earlier attempt of this run): a restart may replay them; skip them.
        history = self.client.get_metric_history(run_id, "loss")
        self.written_upto = max((m.step for m in history), default=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.written_upto:
            self._pending += [(k, float(v), step) for k, v in metrics.items()]

    def flush(self) -> None:
        import time

        from mlflow.entities import Metric

        if not self._pending:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in self._pending]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 500])
        self.written_upto = max(self.written_upto, max(s for _, _, s in self._pending))
        self._pending.clear()

    def drop_pending(self) -> None:
        self._pending.clear()

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        import json

        self.client.log_text(self.run_id, json.dumps(rows, ensure_ascii=False, indent=1), name)

    def log_columns(self, data: dict[str, list], name: str) -> None:
        """An MLflow table (columns of equal length): the UI shows it under Evaluation / Artifacts."""
        self.client.log_table(self.run_id, data=data, artifact_file=name)


class NullTracker(Tracker):
    def __init__(self, *args: Any, **kwargs: Any):
        self._pending = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        pass

    def log_columns(self, data: dict[str, list], name: str) -> None:
        pass


# -- where a run came from ----------------------------------------------------------------------------

def source_tags(script: str) -> dict[str, str]:
    """MLflow's source tags (the UI's "Source", with the commit when this is a git checkout) and our version."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags = {"mlflow.source.name": script, "mlflow.source.type": "JOB"}
    try:
        tags["glmops.version"] = version("glmops")
    except PackageNotFoundError:
        pass

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")  # absent under `ray job submit --working-dir` (no .git is uploaded)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["glmops.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def mark_model_training(client, experiment_id: str) -> None:
    """The experiment kind the MLflow UI offers for model training (instead of guessing GenAI)."""
    if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def _record_schema() -> str:
    """Our instruction-record format, as the MLflow column spec the UI's dataset panel shows."""
    import json

    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    schema = Schema([ColSpec(DataType.string, "instruction"), ColSpec(DataType.string, "input", required=False),
                     ColSpec(DataType.string, "output"),
                     ColSpec(Array(Array(DataType.string)), "history", required=False)])
    return json.dumps({"mlflow_colspec": schema.to_dict()})


def log_dataset(client, run_id: str, *, name: str, source: str, digest: str, profile: dict[str, Any],
                context: str) -> None:
    """One dataset input of a run (the UI's "Datasets"): `digest` is our content hash, `profile` its counts."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    local = Path(source.split(",")[0]).exists() or any(c in source for c in "*?")
    source_type, source_json = ("local", {"uri": source}) if local else ("hugging_face", {"path": source})
    dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps(source_json),
                      schema=_record_schema(), profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def start_system_metrics(uri: str, run_id: str, interval: float):
    """CPU, memory, disk, network and (with NVML) GPU use of this node, sampled into the run as `system/*`.
    Returns the monitor (call `.finish()`), or None when turned off."""
    if interval <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # resume_logging: a worker restored after a failure continues the steps instead of rewriting them
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def link_model_version(client, training_run_id: str, name: str, version: str, alias: str, merge_run_id: str,
                       experiment_id: str) -> None:
    """Point the training run at the model version made from it: tags, and a line in the run's description
    (Markdown, shown on the run page) with links to the version and the merge run."""
    client.set_tag(training_run_id, "glmops.model_version", f"{name}/{version}")
    client.set_tag(training_run_id, "glmops.merge_run_id", merge_run_id)
    note = client.get_run(training_run_id).data.tags.get("mlflow.note.content", "")
    line = (f"Merged and registered as [{name} version {version}](#/models/{name}/versions/{version}) "
            f"(alias @{alias}) by merge run [{merge_run_id[:8]}](#/experiments/{experiment_id}/runs/{merge_run_id}).")
    client.set_tag(training_run_id, "mlflow.note.content", (note + "\n\n" if note else "") + line)
