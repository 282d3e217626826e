"""A multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start` process.

Ray only lets a second node join when it may use a routable address, which on an ordinary machine means
listening beyond loopback. So the whole cluster lives in a private network namespace (`unshare --net`)
whose only interface is its own loopback: nodes find each other on 127.0.0.1 there, and nothing outside
the namespace can reach them. The host name inside is `localhost` (own UTS namespace), which is how Ray
resolves its node address when there is no route out. Everything is stopped by PID, never `ray stop`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray_cluster import RAY_ENV, descendants

NODE_ENV = {**RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # allow joining: safe inside the namespace
            # notice a dead node within seconds instead of the default half minute
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "1000"}


def namespaces_available() -> bool:
    """unshare/nsenter (util-linux), ip (iproute2), and the right to make namespaces (root or user ns)."""
    try:
        return subprocess.run(["unshare", "--net", "--uts", "sh", "-c", "ip link set lo up && command -v nsenter"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _kill_tree(root: int, sig: int = signal.SIGKILL) -> None:
    for pid in reversed(descendants([root])):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class PrivateNetwork:
    """A network + UTS namespace held open by a sleeping process; `run`/`popen` execute inside it."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--net", "--uts", "sleep", "infinity"])
        time.sleep(0.3)
        self.check(["ip", "link", "set", "lo", "up"])
        self.check([sys.executable, "-c", "import socket; socket.sethostname('localhost')"])

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", *cmd]

    def check(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(cmd), check=True, capture_output=True, text=True, **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(cmd), **kw)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


class RayNode:
    """One `ray start --block` process and everything it spawns (raylet, agents, workers)."""

    def __init__(self, proc: subprocess.Popen, log: Path, name: str):
        self.proc, self.log, self.name = proc, log, name
        self.killed = False

    def kill(self) -> None:
        """Like a machine dying: SIGKILL to the node's whole process tree, no goodbye to the cluster."""
        _kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)
        self.killed = True


class MultiNodeCluster:
    """Head (no room for training workers) plus worker nodes that each offer one `trainer_slot`."""

    def __init__(self, work: Path):
        self.net = PrivateNetwork()
        self.temp_dirs: list[str] = []
        self.work = work
        self.port = 6379
        self.env = {**os.environ, **NODE_ENV}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> RayNode:
        log = self.work / f"ray-{name}.log"
        ray = str(Path(sys.executable).with_name("ray"))
        # A folder per node, as on separate machines (shared, every node's log monitor would forward every
        # worker's output). Short: Ray's socket paths must fit in 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        proc = self.net.popen([ray, "start", "--block", "--disable-usage-stats", "--temp-dir", temp_dir, *args],
                              env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        node = RayNode(proc, log, name)
        self.nodes.append(node)
        return node

    def start_head(self) -> RayNode:
        node = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "1",
                                    "--include-dashboard", "false"])
        self.wait_for_nodes(1)
        return node

    def add_worker_node(self, name: str) -> RayNode:
        node = self._start(name, ["--address", self.address, "--num-cpus", "1",
                                  "--resources", '{"trainer_slot": 1}'])
        self.wait_for_nodes(sum(not n.killed for n in self.nodes))  # killed nodes must also be noticed dead
        return node

    def alive_nodes(self) -> int:
        code = ("import ray, json; ray.init(address='auto', logging_level='ERROR'); "
                "print('ALIVE', sum(1 for n in ray.nodes() if n['Alive']))")
        try:
            out = self.net.check([sys.executable, "-c", code], env={**self.env, "RAY_ADDRESS": self.address},
                                 timeout=60).stdout
        except subprocess.CalledProcessError:
            return 0
        return int(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("ALIVE")))

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() == n:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {n} live nodes; logs in {self.work}")

    def run(self, cmd: list[str], env: dict, timeout: int) -> subprocess.Popen:
        """Start a driver (a job) inside the namespace, pointed at this cluster."""
        return self.net.popen(cmd, env={**self.env, **env, "RAY_ADDRESS": self.address}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        for node in self.nodes:
            _kill_tree(node.proc.pid, signal.SIGTERM)
        time.sleep(2)
        for node in self.nodes:
            _kill_tree(node.proc.pid)
        # Anything of this cluster that outlived its node process (matched by the nodes' folders).
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if any(t in cmd for t in self.temp_dirs) and int(d.name) != os.getpid():
                    _kill_tree(int(d.name))
        self.net.close()
