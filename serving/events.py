"""What outlives a replica: counts of engine restarts and of requests ended abnormally, and the drain.

A replica's own metrics (serving/metrics.py) start again from zero when Serve replaces it, and the slow-client
guard runs in Serve's HTTP proxy, not in a replica. So these counts live in one small named Ray actor per
cluster, which every replica and proxy adds to (fire and forget) and the ingress reads for /metrics.

The same actor carries the drain (serving/draining.py): stopping sets it, every model replica sees it within
DRAIN_POLL_S, refuses new requests and reports how many streams it still runs.
"""

from __future__ import annotations

import logging

import ray

NAME, NAMESPACE = "glmops-serving-events", "glmops"

# Why a request that had been admitted ended without finishing (the `reason` label of glmops_requests_ended).
ENDED_REASONS = ("engine_failed", "timeout", "slow_client", "shutdown")

log = logging.getLogger("ray.serve")


@ray.remote(num_cpus=0)
class EventCounts:
    def __init__(self):
        self.counts: dict[str, int] = {}
        self.draining = False
        self.open: dict[str, int] = {}  # replica -> streams it still runs (reported while draining)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def get(self) -> dict[str, int]:
        return dict(self.counts)

    def set_draining(self, draining: bool) -> None:
        if draining != self.draining:  # a second drain (serve run, then Serve's shutdown) keeps the reports
            self.draining, self.open = draining, {}

    def set_plan(self, timeout_s: float, replicas: int) -> None:
        self.plan = (timeout_s, replicas)

    def get_plan(self) -> tuple[float, int]:
        return getattr(self, "plan", (0.0, 0))

    def is_draining(self) -> bool:
        return self.draining

    def report_open(self, replica: str, streams: int) -> None:
        self.open[replica] = streams

    def open_streams(self) -> dict[str, int]:
        return dict(self.open)


_handle = None  # this process's handle on the actor: looking it up is a blocking call to Ray's GCS


def _actor():
    # Detached: the counts must survive the replica that happened to create the actor (that replica may be
    # the one whose engine dies). It holds a few integers and no CPU.
    global _handle
    if _handle is None:
        _handle = EventCounts.options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                                      get_if_exists=True).remote()
    return _handle


def _forget() -> None:
    global _handle
    _handle = None  # the actor is gone (killed by hand, say): the next call makes it again


def record(name: str, n: int = 1) -> None:
    """Add to a count without waiting; a count that cannot be written is logged, never raised."""
    try:
        _actor().add.remote(name, n)
    except Exception as err:  # noqa: BLE001 - counting must never fail a request
        _forget()
        log.warning("could not count serving event %s: %s", name, err)


async def counts() -> dict[str, int]:
    try:
        return await _actor().get.remote()
    except ray.exceptions.RayActorError:
        _forget()
        raise


async def drain_requested() -> bool:
    try:
        return await _actor().is_draining.remote()
    except ray.exceptions.RayActorError:
        _forget()
        raise


def report_open(replica: str, streams: int) -> None:
    _actor().report_open.remote(replica, streams)


def set_draining(draining: bool) -> None:
    ray.get(_actor().set_draining.remote(draining))


def set_drain_plan(timeout_s: float, replicas: int) -> None:
    """What a drain waits for: `replicas` model replicas, at most `timeout_s` (set by the app builder)."""
    ray.get(_actor().set_plan.remote(timeout_s, replicas))


def drain_plan() -> tuple[float, int]:
    return ray.get(_actor().get_plan.remote())


def wait_for_streams(replicas: int, timeout_s: float, poll_s: float = 0.5) -> dict[str, int]:
    """Wait until `replicas` model replicas reported no stream left, or `timeout_s`; returns the last report."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        open_ = ray.get(_actor().open_streams.remote())
        if (len(open_) >= replicas and not any(open_.values())) or time.monotonic() > deadline:
            return open_
        time.sleep(poll_s)


def prometheus_text(values: dict[str, int]) -> str:
    """The counts in Prometheus' text format (appended to the engine's own metrics at /metrics)."""
    lines = ["# HELP glmops_engine_restarts_total replicas replaced because their engine failed",
             "# TYPE glmops_engine_restarts_total counter",
             f"glmops_engine_restarts_total {float(values.get('engine_restart', 0))}",
             "# HELP glmops_requests_ended_total admitted requests ended before their reply finished, by reason",
             "# TYPE glmops_requests_ended_total counter"]
    lines += [f'glmops_requests_ended_total{{reason="{r}"}} {float(values.get(f"ended_{r}", 0))}'
              for r in ENDED_REASONS]
    return "\n".join(lines) + "\n"
