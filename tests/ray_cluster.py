"""A `ray start --head` cluster of our own on loopback, stopped by PID (never `ray stop`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow_server import free_port

from bench.process_memory import process_tree

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def descendants(roots: list[int]) -> list[int]:
    """The processes in `roots` and all their children, grandchildren, ... (from /proc)."""
    found: list[int] = []
    for root in roots:
        found += [p for p in process_tree(root) if p not in found]
    return found


class RayHead:
    def __init__(self, num_cpus: int = 2):
        # Short path: Ray's unix sockets live under it (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus
        self.env = {**os.environ, **RAY_ENV}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def join_env(self) -> dict[str, str]:
        """A driver's environment to join this cluster: its address, and Ray's settings as the head has them
        (a driver expecting token authentication waits minutes on a cluster started without it)."""
        return {**RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{self.port}"}

    def start(self) -> RayHead:
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", "--head", "--num-cpus", str(self.num_cpus), "--node-ip-address", "127.0.0.1",
                        "--port", str(self.port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port), "--temp-dir", self.temp_dir,
                        "--disable-usage-stats"], env=self.env, check=True, capture_output=True, text=True,
                       timeout=120)
        return self

    def pids(self) -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmd or f"--gcs-address=127.0.0.1:{self.port}" in cmd or \
                    f"127.0.0.1:{self.port}" in cmd and "ray" in cmd:
                out.append(int(d.name))
        # Agents rename themselves (ray::DashboardAgent): take every descendant of a matched process too.
        found = descendants(out)
        return [p for p in found if p != os.getpid()]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 2  # give them 2 s to go, but no longer than they take
            while self.pids() and time.time() < deadline:
                time.sleep(0.1)
