"""Stopping drains: running streams may finish before Serve shuts down, whoever stops it.

Ray 2.60's `serve.shutdown()` (what `serve shutdown`, the dashboard and `serve run`'s Ctrl-C call) kills the
HTTP proxies first, which cuts every stream at once, before any replica is asked to drain. So the drain is
ours, run before Serve's own shutdown proceeds:

1. the model replicas are told through the events actor (serving/events.py): they refuse new requests with
   503, let their streams finish within `graceful_shutdown_timeout_s`, end the rest with an error event,
   and report how many streams they still run;
2. once every replica reports none (or the drain timeout passed), Serve's shutdown goes on.

Step 1-2 run in two places: `serve run` on its first Ctrl-C or SIGTERM (`drain_on_signals`), and Serve's
controller when anyone calls `serve.shutdown()` (`drain_before_serve_shuts_down`, installed through Ray's
controller callback, which Ray reads when a node starts, as the proxy guard is).
"""

from __future__ import annotations

import logging
import os
import threading

from serving import events

CONTROLLER_CALLBACK = "serving.draining:drain_before_serve_shuts_down"
DRAIN_MARGIN_S = 5.0  # beyond the drain timeout: for the replicas to end what is left with error events

log = logging.getLogger("ray.serve")


def drain(log_line=print) -> None:
    """Tell the replicas to drain and wait until they ran out of streams or the app's drain timeout passed."""
    timeout_s, replicas = events.drain_plan()
    if not replicas:
        return  # no glmops app on this cluster
    log_line(f"draining: running replies may finish within {timeout_s:g} s (graceful_shutdown_timeout_s); "
             "new requests get 503")
    events.set_draining(True)
    left = events.wait_for_streams(replicas, timeout_s + DRAIN_MARGIN_S)
    log_line(f"drained ({sum(left.values())} streams left); shutting down")


def drain_on_signals() -> None:
    """In `serve run`'s main thread: the first Ctrl-C or SIGTERM drains, then `serve run` shuts Serve down
    (which then finds nothing left to drain); a second signal stops at once."""
    import signal

    stopping = []

    def on_signal(signum, frame):
        if stopping:
            raise KeyboardInterrupt  # the second signal: stop now
        stopping.append(signum)
        print("(signal again to stop at once)", flush=True)
        drain(lambda line: print(line, flush=True))
        raise KeyboardInterrupt  # `serve run` answers it with serve.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def drain_before_serve_shuts_down() -> None:
    """Ray calls this in Serve's controller as it starts (RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH).

    Serve's controller runs its shutdown one control-loop step at a time (its `shutdown()`, called each step
    once `serve.shutdown()` was asked for); on the controller found in the calling frames, the first step
    here starts the drain in a thread, and Serve's steps only proceed once it is done. Ray is pinned (2.60.0): tests/test_serving_health.py stops
    a running app with `serve shutdown` and checks its streams finished."""
    import sys
    import types

    frame = sys._getframe(1)  # Ray calls us from the controller's __init__: that `self` is the controller
    while frame is not None and not hasattr(frame.f_locals.get("self"), "run_control_loop_step"):
        frame = frame.f_back
    if frame is None:
        log.warning("not called from Serve's controller: `serve shutdown` will not drain")
        return
    controller = frame.f_locals["self"]
    serve_shutdown = controller.shutdown  # bound: Serve's own
    done = threading.Event()
    started: list[threading.Thread] = []

    def run() -> None:
        try:
            drain(log.info)
        except Exception as err:  # noqa: BLE001 - a drain that cannot run must not block the shutdown
            log.warning("could not drain before shutting down: %s", err)
        done.set()

    def shutdown(self):
        if not self._shutting_down:
            return serve_shutdown()
        if not started:
            started.append(threading.Thread(target=run, name="glmops-drain", daemon=True))
            started[0].start()
        if done.is_set():
            return serve_shutdown()
        return None  # streams still finishing: the next control-loop step asks again

    controller.shutdown = types.MethodType(shutdown, controller)  # what its control loop calls each step


def install_in_controller() -> None:
    """Ask the Serve controller of the Ray cluster this process is about to start to drain on shutdown (as
    `slow_clients.install_in_proxy`: only before Ray starts; infra/ sets it for clusters of your own)."""
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"):
        os.environ["RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"] = CONTROLLER_CALLBACK
