"""Clients that stop reading are cut off in Serve's HTTP proxy, the one process that can see them.

Nothing between the engine and the client waits for the client: the replica streams chunks to the proxy
through Ray without backpressure, so a reply whose client reads nothing piles up in the proxy and keeps its
KV-cache slot until it has generated everything. Worse, the socket's kernel buffers hold a whole reply
(a 4,096-token reply is ~1 MB of events; loopback buffers take several MB), so the proxy's `send` never even
blocks: the only sign of a stalled client is that it acknowledges no bytes.

This middleware, installed in the proxy through Serve's proxy callback (`install_in_proxy`), watches each
streamed response's socket: when bytes wait for the client (TIOCOUTQ > 0) and the client has acknowledged
none of them (TCP_INFO's bytes_acked unchanged) for `stalled_client_timeout_s`, or a `send` blocks that
long, the request ends as if the client had hung up. The proxy then cancels it on the replica, which frees
the slot at once, and the connection is closed. So a stream's pending output is bounded by what the client
took plus `stalled_client_timeout_s` of its reply.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import termios
import time

log = logging.getLogger("ray.serve")

WATCH_PERIOD_S = 0.5
_TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (since 4.1)


def socket_of(send):
    """The client socket behind uvicorn's `send` (its RequestResponseCycle's transport), or None."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None


def output_progress(sock) -> tuple[int, int] | None:
    """(bytes waiting in the kernel for the client, bytes the client acknowledged so far), or None."""
    try:
        waiting = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_ACKED + 8)
        return waiting, struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0]
    except (OSError, struct.error, ValueError):
        return None


class StalledClientGuard:
    """ASGI middleware: a streamed response's client must take some output every `timeout_s`."""

    def __init__(self, app, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.timeout_s:
            return await self.app(scope, receive, send)
        stalled = asyncio.Event()
        watch: list[asyncio.Task] = []

        def cut(why: str) -> None:
            if stalled.is_set():
                return
            stalled.set()
            log.warning("a client %s for %.0f s (stalled_client_timeout_s): %s %s cut off", why, self.timeout_s,
                        scope.get("method"), scope.get("path"))
            from serving import events

            events.record("ended_slow_client")

        async def watch_socket(sock) -> None:
            last, since = None, time.monotonic()
            while not stalled.is_set():
                await asyncio.sleep(WATCH_PERIOD_S)
                progress = output_progress(sock)
                if progress is None:
                    return
                waiting, acked = progress
                if not waiting or acked != last:
                    last, since = acked, time.monotonic()
                elif time.monotonic() - since > self.timeout_s:
                    cut("acknowledged none of its pending output")

        async def guarded_send(message):
            if stalled.is_set():
                return  # the client is being dropped: nothing more is written to it
            if not watch and message["type"] == "http.response.body" and message.get("more_body"):
                sock = socket_of(send)  # a streamed response: watch its socket until it ends
                if sock is not None:
                    watch.append(asyncio.get_running_loop().create_task(watch_socket(sock)))
            try:
                async with asyncio.timeout(self.timeout_s):  # a timer, no task per chunk
                    await send(message)
            except TimeoutError:
                cut("took no output (the proxy's send waited)")

        async def guarded_receive():
            # The proxy waits here for the client's disconnect; a stall counts as one.
            if stalled.is_set():
                return {"type": "http.disconnect"}
            got, cut_off = asyncio.ensure_future(receive()), asyncio.ensure_future(stalled.wait())
            try:
                await asyncio.wait({got, cut_off}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (got, cut_off):
                    if not task.done():
                        task.cancel()
            return got.result() if got.done() and not got.cancelled() else {"type": "http.disconnect"}

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            for task in watch:
                task.cancel()


PROXY_CALLBACK = "serving.slow_clients:proxy_middlewares"
TIMEOUT_ENV = "GLMOPS_STALLED_CLIENT_TIMEOUT_S"


def proxy_middlewares() -> list:
    """Serve's proxy calls this at start-up (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): its middlewares."""
    from starlette.middleware import Middleware

    timeout_s = float(os.environ.get(TIMEOUT_ENV) or 0)
    return [Middleware(StalledClientGuard, timeout_s=timeout_s)] if timeout_s > 0 else []


def install_in_proxy(timeout_s: float) -> None:
    """Ask the proxies of the Ray cluster this process is about to start to run the guard. Ray 2.60 takes
    proxy middlewares only from the environment its processes start with, so this works only before Ray
    starts (`serve run` calls the app builder first); a cluster started elsewhere needs both variables at
    `ray start` (infra/ray, infra/kuberay set them), and `guarded_here` tells whether it has them."""
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"):
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = PROXY_CALLBACK
        os.environ[TIMEOUT_ENV] = str(timeout_s)


def guarded_here() -> bool:
    """Whether this node's processes (a replica here, so its proxy too) were started with the guard."""
    return os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == PROXY_CALLBACK \
        and float(os.environ.get(TIMEOUT_ENV) or 0) > 0
