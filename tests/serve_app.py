"""`serve run serving:app ...` as a user starts it, on a free loopback port, stopped by its own PID group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow_server import free_port, wait_until_healthy
from ray_cluster import RAY_ENV


class ServeApp:
    def __init__(self, log_dir: Path, env: dict | None = None, **args: str):
        """`args`: the app's key=value arguments; `env`: more environment for serve run (and its Ray)."""
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = {**args, "port": str(self.port)}
        self.log_path = log_dir / "serve.log"

    def start(self, timeout: float = 180) -> ServeApp:
        serve = str(Path(sys.executable).with_name("serve"))
        env = {**os.environ, **RAY_ENV, "GRADIO_ANALYTICS_ENABLED": "False", "GLMOPS_SERVE_THREADS": "1",
               **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([serve, "run", "serving:app", *(f"{k}={v}" for k, v in self.args.items())],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        wait_until_healthy(self.url + "/health", self.proc, self.log_path, timeout, "serve run", poll=0.25)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # one Ctrl-C: Serve deletes the app and Ray shuts down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
