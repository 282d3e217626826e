"""Peak resident memory of a process and everything it starts (Ray's raylet, workers, actors), by polling /proc.

    with PeakRSS(proc.pid) as peaks:
        proc.wait()
    peaks.table()   # [(peak GiB, pid, what the process is), ...], largest first
"""

from __future__ import annotations

import threading
from pathlib import Path


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its children, grandchildren, ... (from /proc)."""
    children, found, stack = _children(), [root], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in found:
                found.append(c)
                stack.append(c)
    return found


def _rss_and_name(pid: int) -> tuple[int, str] | None:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return rss, describe(cmd)


def describe(cmdline: str) -> str:
    """A short name: Ray names its worker processes by what they run (ray::RayTrainWorker, ...)."""
    words = cmdline.split(" ")
    if words[0].startswith("ray::"):
        return words[0]
    script = next((w for w in words[1:] if w.endswith(".py") or w.startswith("-m")), None)
    if "python" in Path(words[0]).name and script:  # a Python program: its script, not the interpreter's path
        return "python " + (script if not script.startswith("/") else Path(script).name)
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if key in cmdline:
            return key
    return Path(words[0]).name


class PeakRSS:
    """Samples the tree under `root` every `interval` seconds; keeps each process's peak RSS."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.peaks: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(self.root):
                got = _rss_and_name(pid)
                if got and got[0] > self.peaks.get(pid, (0, ""))[0]:
                    self.peaks[pid] = got
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def table(self) -> list[tuple[float, int, str]]:
        return sorted(((rss / 2**30, pid, name) for pid, (rss, name) in self.peaks.items()), reverse=True)

    def peak_of(self, name_prefix: str) -> float:
        """The largest peak (GiB) among processes whose name starts with `name_prefix` (0 if none)."""
        return max((gib for gib, _, name in self.table() if name.startswith(name_prefix)), default=0.0)
