"""A throwaway PostgreSQL server on loopback (Debian's postgresql), for MLflow's production backend."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from mlflow_server import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Postgres:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="glmops-pg-")
        # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")

    @staticmethod
    def available() -> bool:
        return _bin("initdb") is not None and _bin("pg_ctl") is not None

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> Postgres:
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        data = os.path.join(self.dir, "data")
        self._run(_bin("initdb"), "-D", data, "-U", self.user, "--auth=trust", "-E", "UTF8")
        self._run(_bin("pg_ctl"), "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "start", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.dir}")
        self._run(_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "mlflow")
        return self

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", os.path.join(self.dir, "data"), "-m", "fast", "-w", "stop")
        finally:
            time.sleep(0.5)
            shutil.rmtree(self.dir, ignore_errors=True)
