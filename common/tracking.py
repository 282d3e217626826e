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
