"""Serving that stays up: a dead engine heals, no stream ends silently, stopping drains, deadlines and
stalled clients cannot hold a slot.

Marked slow: each app is a real `serve run` on the tiny model. Its engine steps are slowed to ~10 ms
(GLMOPS_TEST_ENGINE_STEP_DELAY_S) so that a reply takes as long as a real model's and can be interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from ray_cluster import descendants
from serve_app import ServeApp

pytestmark = pytest.mark.slow

SLOW_STEPS = {"GLMOPS_TEST_ENGINE_STEP_DELAY_S": "0.01"}
URL = "/v1/chat/completions"


def body(tokens: int, stream: bool = True, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "min_tokens": tokens,
            "stream": stream, "temperature": 0.8, **extra}


def read_stream(url: str, payload: dict, on_line=None, timeout: float = 120) -> list[str]:
    """The data lines of one streamed reply, in order."""
    lines = []
    with httpx.stream("POST", url + URL, json=payload, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if on_line:
                    on_line(lines)
    return lines


def error_of(lines: list[str]) -> dict:
    """A stream that the server ended: an error event in OpenAI's shape, then [DONE]."""
    assert lines[-1] == "[DONE]", lines[-3:]
    return json.loads(lines[-2])["error"]


def wait_for(predicate, timeout: float, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not within {timeout} s")


def health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=30)


def idle(url: str) -> bool:
    h = health(url)
    return h.status_code == 200 and h.json()["running"] == 0 and h.json()["free_slots"] == h.json()["max_num_seqs"]


def counts(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name + (f"[{s.labels['reason']}]" if "reason" in s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model):
    # The engine in its own process, as on every GPU.
    server = ServeApp(tmp_path_factory.mktemp("serve-health"), env=SLOW_STEPS, model=str(tiny_model),
                      engine_process="true", ui="false", stalled_client_timeout_s="4").start()
    yield server
    server.stop()


def engine_processes(server: ServeApp) -> list[psutil.Process]:
    """The engine process of this app's model replica (a multiprocessing child; never another session's)."""
    found = []
    for pid in descendants([server.proc.pid]):
        try:
            p = psutil.Process(pid)
            if "multiprocessing.spawn" in " ".join(p.cmdline()) and "ChatModel" in psutil.Process(p.ppid()).name():
                found.append(p)
        except psutil.Error:
            pass
    return found


def content_chunks(lines: list[str]) -> int:
    return sum(1 for line in lines if line.startswith("{") and (json.loads(line).get("choices") or [{}])[0]
               .get("delta", {}).get("content"))


def test_one_stream_gets_each_token_as_it_comes_and_many_streams_get_merged_chunks(app):
    """A replica sends at most ~800 chunks a second (serving/model.py CHUNK_RATE): a stream alone gets a chunk per
    token (~10 ms apart here), 16 at once wait up to 20 ms between chunks and so get about two tokens in each."""
    alone = content_chunks(read_stream(app.url, body(40, temperature=0)))
    assert alone >= 30  # tokens that end half a character wait for the rest, so not quite 40

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> int:
                payload = body(40, temperature=0, messages=[{"role": "user", "content": f"hi {i}"}])
                async with client.stream("POST", app.url + URL, json=payload) as r:
                    return content_chunks([line[6:] async for line in r.aiter_lines() if line.startswith("data: ")])
            return await asyncio.gather(*(one(i) for i in range(16)))

    together = asyncio.run(many())
    assert sum(together) < 0.75 * 16 * 40, together


def test_a_killed_engine_process_ends_its_stream_with_an_error_and_the_replica_heals(app):
    [engine] = engine_processes(app)
    statuses, stop = [], threading.Event()

    def poll():  # a client hitting the API every 0.5 s throughout
        while not stop.is_set():
            for r in (httpx.post(app.url + URL, json=body(4, stream=False), timeout=60), health(app.url)):
                statuses.append((r.status_code, r.headers.get("content-type"), r.text))
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    killed = []

    def kill_after_first_chunks(lines):
        if len(lines) == 4 and not killed:
            engine.send_signal(signal.SIGKILL)  # as the kernel's OOM killer or a CUDA fault would
            killed.append(time.time())

    lines = read_stream(app.url, body(1500), kill_after_first_chunks)
    err = error_of(lines)
    assert err["type"] == "server_error" and err["code"] == "engine_failed" and "engine" in err["message"]
    assert not any('"finish_reason": "length"' in x for x in lines)  # cut, and said so
    outage = health(app.url)
    assert outage.status_code == 503 and outage.json()["status"] in ("engine_restarting", "unavailable")
    assert outage.json()["reason"] and int(outage.headers["retry-after"]) >= 1
    # Serve replaces the replica (health check every 2 s, 3 failures); the model loads again.
    recovered = wait_for(lambda: httpx.post(app.url + URL, json=body(4, stream=False), timeout=60)
                         .status_code == 200 and time.time(), 60, poll=0.5)
    stop.set()
    poller.join(timeout=120)
    print(f"recovered {recovered - killed[0]:.1f} s after the engine was killed")
    assert {s for s, _, _ in statuses} <= {200, 503, 429}, statuses
    assert 503 in {s for s, _, _ in statuses}  # the poller saw the outage, in OpenAI's shape
    for status, kind, text in statuses:
        if status != 200:
            assert kind == "application/json" and json.loads(text)["error"]["message"]
    after = counts(app.url)
    assert after["glmops_engine_restarts_total"] >= 1
    assert after["glmops_requests_ended_total[engine_failed]"] >= 1
    assert engine_processes(app) and engine_processes(app)[0].pid != engine.pid


def test_a_request_past_its_timeout_ends_with_an_error_naming_it_and_frees_its_slot(app):
    wait_for(lambda: health(app.url).status_code == 200, 60)
    before = counts(app.url)
    t0 = time.time()
    lines = read_stream(app.url, body(2000, timeout=1))  # 2,000 tokens take ~20 s here
    err = error_of(lines)
    assert err["code"] == "timeout" and "timeout of 1 s" in err["message"] and time.time() - t0 < 10
    wait_for(lambda: idle(app.url), 10)
    plain = httpx.post(app.url + URL, json=body(2000, stream=False, timeout=1), timeout=60)
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "timeout"
    assert counts(app.url)["glmops_requests_ended_total[timeout]"] == before["glmops_requests_ended_total[timeout]"] + 2
    bad = httpx.post(app.url + URL, json=body(4, stream=False, timeout=0), timeout=60)
    assert bad.status_code == 400 and "timeout" in bad.json()["error"]["message"]


def test_a_client_that_stops_reading_is_cut_off_without_slowing_the_others(app):
    wait_for(lambda: idle(app.url), 60)

    async def others() -> list[float]:
        async def one(client):
            t0 = time.time()
            async with client.stream("POST", app.url + URL, json=body(200)) as r:
                async for _ in r.aiter_lines():
                    pass
            return time.time() - t0

        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    alone = max(asyncio.run(others()))
    before = counts(app.url)
    # A client with a small receive buffer that sends its request and then reads nothing.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    stalled.connect(("127.0.0.1", app.port))
    payload = json.dumps(body(2000)).encode()
    stalled.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % (URL.encode(), len(payload)) + payload)
    try:
        wait_for(lambda: health(app.url).json()["running"] == 1, 30)
        with_stalled = max(asyncio.run(others()))
        assert with_stalled < 1.5 * alone + 1.0, (alone, with_stalled)  # theirs at their normal speed
        # 2,000 tokens take ~20 s: the guard (4 s without progress) frees the slot well before that.
        t0 = time.time()
        wait_for(lambda: idle(app.url), 30)
        assert counts(app.url)["glmops_requests_ended_total[slow_client]"] == \
            before["glmops_requests_ended_total[slow_client]"] + 1
        assert time.time() - t0 < 20
    finally:
        stalled.close()
    # Either watch may see the stall first: the socket's unacknowledged bytes, or the proxy's send waiting.
    # The replica's log reaches the file a moment after the counter moves.
    cut_off = re.compile(r"a client (acknowledged none of its pending output|took no output \(the proxy's send waited\))"
                         r" for 4 s \(stalled_client_timeout_s\): POST /v1/chat/completions cut off")
    wait_for(lambda: cut_off.search(app.log_path.read_text(errors="replace")), 15)


def test_serve_shutdown_during_8_streams_lets_all_8_finish_and_refuses_new_requests(app):
    """`serve shutdown` (the CLI, through the dashboard): Ray 2.60 would kill the HTTP proxies first, cutting
    every stream; the app drains before Serve's shutdown goes on (serving/draining.py)."""
    import re
    import sys
    from pathlib import Path

    wait_for(lambda: idle(app.url), 60)
    dashboard = re.search(r"dashboard at \S*?(http://127\.0\.0\.1:\d+)", app.log_path.read_text(errors="replace"))
    serve = str(Path(sys.executable).with_name("serve"))

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one():
                lines = []
                async with client.stream("POST", app.url + URL, json=body(600)) as r:  # ~7 s
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])
                return lines

            streams = [asyncio.create_task(one()) for _ in range(8)]
            await asyncio.sleep(0.5)
            stop = await asyncio.create_subprocess_exec(serve, "shutdown", "-a", dashboard.group(1), "-y",
                                                        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            while (await client.get(app.url + "/health")).status_code == 200:  # until the drain began
                await asyncio.sleep(0.1)
            late = await client.post(app.url + URL, json=body(4, stream=False))
            assert not any(t.done() for t in streams)  # the drain began while all 8 still ran
            done = await asyncio.gather(*streams)
            return done, late, await stop.wait()

    done, late, code = asyncio.run(main())
    assert code == 0
    for lines in done:  # every stream ran to its length
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length", lines[-2:]
    assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
    wait_for(lambda: "drained (0 streams left)" in app.log_path.read_text(errors="replace"), 30)
    assert "draining: 8 streams may finish" in app.log_path.read_text(errors="replace")


# -- the engine inside the replica, and stopping ----------------------------------------------------------

@pytest.fixture(scope="module")
def inproc(tmp_path_factory, tiny_model):
    # The in-process engine (CPU's default) with a fault injected into its loop once a reply reaches 600
    # tokens, as a CUDA error would raise there; a 2 s drain on stopping.
    server = ServeApp(tmp_path_factory.mktemp("serve-inproc"),
                      env={**SLOW_STEPS, "GLMOPS_TEST_ENGINE_FAULT_AFTER": "600"}, model=str(tiny_model),
                      engine_process="false", ui="false", graceful_shutdown_timeout_s="2").start()
    yield server
    server.stop()


def test_a_fault_in_the_in_process_engine_loop_ends_the_stream_and_the_replica_is_replaced(inproc):
    lines = read_stream(inproc.url, body(1000))
    err = error_of(lines)
    assert err["code"] == "engine_failed" and "injected engine fault" in err["message"]
    assert health(inproc.url).status_code == 503
    wait_for(lambda: httpx.post(inproc.url + URL, json=body(8, stream=False), timeout=60).status_code == 200, 60)
    assert counts(inproc.url)["glmops_engine_restarts_total"] >= 1


def test_stopping_serve_run_lets_8_streams_finish_refuses_new_ones_and_ends_the_rest_at_the_drain_timeout(inproc):
    wait_for(lambda: idle(inproc.url), 60)

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(tokens: int):
                lines = []
                async with client.stream("POST", inproc.url + URL, json=body(tokens)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])
                return lines

            short = [asyncio.create_task(one(100)) for _ in range(8)]  # ~1.5 s each: within the 2 s drain
            long = asyncio.create_task(one(590))  # ~7 s: past the drain (and short of the injected fault)
            await asyncio.sleep(0.5)
            os.kill(inproc.proc.pid, signal.SIGTERM)  # what a container runtime sends `serve run`
            await asyncio.sleep(1.0)
            late = await client.post(inproc.url + URL, json=body(4, stream=False))
            return await asyncio.gather(*short), await long, late

    short, long, late = asyncio.run(main())
    for lines in short:
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
    assert error_of(long)["code"] == "shutdown" and "drain timeout of 2 s" in error_of(long)["message"]
    assert inproc.proc.wait(timeout=60) == 0
    log = inproc.log_path.read_text(errors="replace")
    assert "draining: running replies may finish within 2 s" in log
    # A redeploy drains through Serve's own flag on the replica: the replicas found it (Ray is pinned).
    assert "cannot see when Serve drains" not in log
