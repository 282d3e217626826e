"""A real `mlflow server` (SQLite backend, loopback, free port) for the tests that track runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str,
                       poll: float = 0.5) -> None:
    """Poll `url` until it answers; fail early, with the log's tail, if the server process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited:\n" + log.read_text()[-3000:]) from None
            time.sleep(poll)
    raise RuntimeError(f"{what} did not become healthy:\n" + log.read_text()[-3000:])


class MlflowServer:
    def __init__(self, root: Path, backend_uri: str | None = None):
        self.root = root
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.root / "mlflow-server.log", "w")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until_healthy(self.uri + "/health", self.proc, self.root / "mlflow-server.log", timeout, "mlflow server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # our own process group only
            self.proc.wait(timeout=30)
