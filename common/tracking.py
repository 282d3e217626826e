"""Experiment tracking behind a small interface, with a do-nothing twin for ranks other than 0.

Step metrics are buffered and written when a checkpoint is kept: if a worker dies, Ray restores the
last checkpoint and the steps after it run again; since only steps up to a kept checkpoint were ever
written, nothing is logged twice.

A tracking server that goes away in the middle of a run (restarted, redeployed, its database failing over)
does not fail the run: every call waits for it with backoff (`retrying`), up to TRACKING_PATIENCE_S, and
the buffered metrics stay buffered until they are written. A retried write sends the same metric
timestamps, so a write that reached the store before the connection broke is not stored twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.config import PROJECT_ROOT
from common.errors import UserError


def default_tracking_uri(explicit: str | None) -> str:
    """--mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else an SQLite store in the project folder."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative to where it was typed: Ray's workers run in their own folders, so pass it on absolute
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}" if (Path.cwd() / "jobs").is_dir() else \
        f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to an SQLite store (never the process's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


TRACKING_PATIENCE_S = float(os.environ.get("GLMOPS_TRACKING_PATIENCE_S", 3600))  # how long a run waits for MLflow
_T = TypeVar("_T")


def _transient(err: Exception) -> bool:
    """A failure worth waiting out: the server unreachable or failing, not a request it refused."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    return isinstance(err, OSError) or type(err).__module__.startswith(("requests", "urllib3"))


def retrying(what: str, call: Callable[[], _T], patience_s: float | None = None, log=print) -> _T:
    """`call()`, retried with backoff (1 s doubling to 10 s) while the tracking server is unreachable; says so
    once per outage and when it is back. Past `patience_s` (TRACKING_PATIENCE_S) the last error is raised."""
    patience_s = TRACKING_PATIENCE_S if patience_s is None else patience_s
    start, delay, tries = time.monotonic(), 1.0, 0
    while True:
        try:
            result = call()
        except Exception as err:  # noqa: BLE001 - sorted by _transient below
            if not _transient(err) or time.monotonic() - start + delay > patience_s:
                raise
            tries += 1
            if tries == 1:
                log(f"MLflow tracking server unreachable while {what} ({type(err).__name__}); nothing is lost: "
                    f"retrying every {delay:.0f}-10 s for up to {patience_s / 60:.0f} min "
                    "(GLMOPS_TRACKING_PATIENCE_S)", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        if tries:
            log(f"MLflow tracking server is back: {what} done after {time.monotonic() - start:.0f} s", flush=True)
        return result


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
    """Writes to one MLflow run (created by the driver) from rank 0 of the workers.

    Writes go through a thread of their own, in order, so training never waits for the tracking server;
    `close()` at the end waits until everything is written. Metrics not yet written when a checkpoint is
    kept travel in it (`save_unwritten`, `restore_unwritten`), so a worker restored during an outage loses none."""

    UNWRITTEN = "unwritten_metrics.json"

    def __init__(self, uri: str, run_id: str):
        import queue
        import threading

        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self._pending: list[tuple[str, float, int, int]] = []  # key, value, step, timestamp (ms); not yet flushed
        self._queued: list[tuple[str, float, int, int]] = []   # flushed, not yet written
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        # Steps already written (an earlier attempt of this run): a restart may replay them; skip them.
        history = retrying("reading the run's history", lambda: self.client.get_metric_history(run_id, "loss"))
        self.written_upto = max((m.step for m in history), default=0)
        self._writer = threading.Thread(target=self._write, name="mlflow-writer", daemon=True)
        self._writer.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.written_upto:
            now = int(time.time() * 1000)  # fixed here: a retried write repeats it, so the store keeps one copy
            self._pending += [(k, float(v), step, now) for k, v in metrics.items()]

    def flush(self) -> None:
        """Hand the buffered metrics to the writer (called once a checkpoint covering them is kept)."""
        self._raise_writer_error()
        if self._pending:
            with self._lock:
                self._queued += self._pending
            self._pending = []
            self._jobs.put(self._write_metrics)

    def drop_pending(self) -> None:
        self._pending.clear()

    def save_unwritten(self, folder: Path) -> None:
        """Into a checkpoint being saved: every metric not yet in the store (the writer may be waiting)."""
        import json

        with self._lock:
            rows = self._queued + self._pending
        if rows:
            (folder / self.UNWRITTEN).write_text(json.dumps(rows))

    def restore_unwritten(self, folder: Path) -> None:
        """From a restored checkpoint: write what it carries (the store drops what it already has)."""
        import json

        path = folder / self.UNWRITTEN
        if path.is_file():
            with self._lock:
                self._queued += [tuple(r) for r in json.loads(path.read_text())]
            self._jobs.put(self._write_metrics)

    def log_text(self, text: str, name: str) -> None:
        self._jobs.put(lambda: retrying(f"writing {name}", lambda: self.client.log_text(self.run_id, text, name)))

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        import json

        self.log_text(json.dumps(rows, ensure_ascii=False, indent=1), name)

    def log_columns(self, data: dict[str, list], name: str) -> None:
        """An MLflow table (columns of equal length): the UI shows it under Evaluation / Artifacts."""
        self._jobs.put(lambda: retrying(f"writing {name}", lambda: self.client.log_table(
            self.run_id, data=data, artifact_file=name)))

    def close(self) -> None:
        """Wait until everything handed over is written (the end of training)."""
        self._jobs.put(None)
        self._writer.join()
        self._raise_writer_error()

    # -- the writer thread --------------------------------------------------------------------------------
    def _write(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - raised in the training thread at its next flush
                self._error = err
                return

    def _write_metrics(self) -> None:
        from mlflow.entities import Metric

        while True:  # a batch at a time, dropped from the buffer only once written
            with self._lock:
                batch = self._queued[:500]
            if not batch:
                return
            metrics = [Metric(k, v, t, s) for k, v, s, t in batch]
            retrying(f"logging the metrics of steps {batch[0][2]}-{batch[-1][2]}",
                     lambda m=metrics: self.client.log_batch(self.run_id, metrics=m))
            with self._lock:
                del self._queued[:len(batch)]
            self.written_upto = max(self.written_upto, max(s for _, _, s, _ in batch))

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"could not write to MLflow: {type(self._error).__name__}: {self._error}") \
                from self._error


class NullTracker(Tracker):
    def __init__(self, *args: Any, **kwargs: Any):
        self._pending = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def save_unwritten(self, folder: Path) -> None:
        pass

    def restore_unwritten(self, folder: Path) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        pass

    def log_columns(self, data: dict[str, list], name: str) -> None:
        pass

    def close(self) -> None:
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


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if it does not exist. Two jobs started together on a new experiment
    both find it missing; the one whose create loses takes the winner's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root_for(uri))
    except MlflowException as err:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise err
        return exp.experiment_id


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
