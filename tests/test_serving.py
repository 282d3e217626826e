"""The real Serve app on the tiny model: OpenAI API (streamed and not), Gradio page, terminal client,
concurrency, disconnects and bad requests. Marked slow: it starts `serve run` once for the module."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import pytest
from serve_app import ServeApp

pytestmark = pytest.mark.slow

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    app = ServeApp(tmp_path_factory.mktemp("serve"), model=str(tiny_model), api_key=KEY,
                   max_concurrent_requests="40").start()
    yield app
    app.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY)


def test_openai_client_non_streamed(client):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "你好"}], max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_openai_client_streams_chunks_before_generation_ends(client):
    t0 = time.time()
    first, chunks, text = None, 0, ""
    # Long enough to span many stream intervals (40 ms) however fast the engine runs the tiny model.
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "List two colors."}],
                                            max_tokens=1500, extra_body={"min_tokens": 1500}, stream=True,
                                            temperature=0.8)
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first or time.time() - t0
            chunks += 1
            text += delta
    total = time.time() - t0
    assert chunks > 10 and first is not None
    assert first < total / 2, (first, total)
    # The random model emits bytes that form no character (test_engine checks it does): none reach the client.
    assert "\ufffd" not in text


def test_models_and_health(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert r["data"][0]["object"] == "model"


@pytest.mark.parametrize("body,status,fragment", [
    ("{not json", 400, "not valid JSON"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "at least one message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages[1].role: expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "很长的问题" * 1200}], "max_tokens": 10}, 400, "over this server's max_model_len"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n: only 1 choice"),
    ('{"messages": [{"role": "user", "content": "\\ud800x"}]}', 400, "messages[0].content: not valid Unicode"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens: must be > 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens: at most"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content: required"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400, "tool_choice: needs tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "template 'chatglm2' has no tool-call format"),
])
def test_bad_requests_are_4xx_naming_the_field(server, body, status, fragment):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=data,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_a_body_that_is_not_utf8_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_size_limit_is_a_413_whether_its_length_is_declared_or_not(server):
    from serving.api import MAX_REQUEST_BYTES

    big = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

    def chunked():  # no Content-Length: the server must count what it reads
        for k in range(0, len(big), 65536):
            yield big[k:k + 65536]

    for content in (big, chunked()):
        r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=60)
        assert r.status_code == 413, r.text
        assert "MAX_REQUEST_BYTES" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                    content=(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
                             for _ in range(1)))  # a small chunked body still works
    assert ok.status_code == 200, ok.text


def test_a_wrong_api_key_is_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_32_concurrent_streams_all_complete(server):
    async def one(i: int, client: httpx.AsyncClient) -> str:
        body = {"messages": [{"role": "user", "content": f"计算 {i} 加 2"}], "max_tokens": 24, "stream": True}
        done = False
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
        return done

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(i, client) for i in range(32)))

    assert all(asyncio.run(main()))


async def _stream(client, url, i: int, tokens: int, leave_after: int | None = None) -> dict:
    """One streamed request; returns what arrived. `leave_after`: disconnect after that many deltas."""
    body = {"messages": [{"role": "user", "content": f"计算 {i} 加 2"}], "max_tokens": tokens, "min_tokens": tokens,
            "stream": True, "temperature": 0.8}
    got = {"deltas": 0, "usage": None, "done": False}
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as r:
        got["status"] = r.status_code
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                got["done"] = True
            elif line.startswith("data: {"):
                chunk = json.loads(line[6:])
                got["usage"] = chunk.get("usage") or got["usage"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    got["deltas"] += 1
                    if leave_after is not None and got["deltas"] >= leave_after:
                        return got  # leaving the context manager closes the connection
    return got


def test_64_streams_with_a_third_leaving_early_all_others_complete_and_the_cache_empties(server):
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(_stream(client, server.url, i, 48, leave_after=2 if i % 3 == 0 else None)
                                          for i in range(64)))

    log_before = server.log_path.read_text(errors="replace")
    results = asyncio.run(main())
    stayed = [r for i, r in enumerate(results) if i % 3]
    assert all(r["status"] == 200 for r in results)
    assert all(r["done"] and r["usage"]["completion_tokens"] == 48 for r in stayed), stayed[:3]
    deadline = time.time() + 5
    while time.time() < deadline and httpx.get(server.url + "/health").json()["running"] > 0:
        time.sleep(0.2)
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0 and health["kv_cache_used_tokens"] == 0
    assert health["free_slots"] == health["max_num_seqs"]
    new_log = server.log_path.read_text(errors="replace")[len(log_before):]
    # Ray Serve 2.60 itself may log "Task exception was never retrieved ... TaskCancelledError" from its
    # HTTP receive loop when a client hangs up; nothing of ours may fail or log an error.
    assert " ERROR " not in new_log and "serving/" not in new_log and "common/" not in new_log, new_log[-3000:]


def test_metrics_are_prometheus_text_and_move_with_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    def sample() -> dict:
        text = httpx.get(server.url + "/metrics").text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = sample()
    for name in ("glmops_requests_running", "glmops_requests_waiting", "glmops_requests_rejected_total",
                 "glmops_time_to_first_token_seconds_count", "glmops_time_per_output_token_seconds_count",
                 "glmops_kv_cache_used_tokens", "glmops_kv_cache_capacity_tokens"):
        assert name in before, name
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "min_tokens": 6})
    assert r.status_code == 200
    after = sample()
    assert after["glmops_requests_finished_total"] == before["glmops_requests_finished_total"] + 1
    assert after["glmops_generated_tokens_total"] >= before["glmops_generated_tokens_total"] + 6
    assert after["glmops_time_to_first_token_seconds_count"] == before["glmops_time_to_first_token_seconds_count"] + 1


def test_a_client_that_disconnects_frees_its_slot(server):
    # 1900 tokens take the tiny model several seconds on CPU; the slot must be free well before that.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900, "min_tokens": 1900, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # read without leaving the generator: closing it would disconnect already
        while '"content": "' not in (line := next(lines)) or '"content": ""' in line:
            pass
        assert httpx.get(server.url + "/health").json()["active_streams"] >= 1
    deadline = time.time() + 2
    while time.time() < deadline and httpx.get(server.url + "/health").json()["active_streams"] > 0:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health").json()["active_streams"] == 0


def test_gradio_page_streams_through_the_deployment_and_needs_the_key(server):
    from gradio_client import Client

    c = Client(server.url + "/ui/", verbose=False)
    refused = c.predict("你好", 32, 0.7, 0.95, "wrong", "", api_name="/respond")  # "": no tools
    assert "API key" in refused
    job = c.submit("你好", 32, 0.7, 0.95, KEY, "", api_name="/respond")
    outputs = [o for o in job]  # the partial replies as they grew
    assert job.outputs() and isinstance(job.outputs()[-1], str)
    assert len(outputs) >= 1


def test_terminal_client_two_turns_clear_and_stop(server):
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "serving.client", "--url", server.url, "--api_key", KEY,
                                           "--max_tokens", "8"], encoding="utf-8", timeout=60)
    child.expect("you\\): ")
    child.sendline("你好")
    child.expect("ChatGLM: ")
    child.expect("you\\): ")
    child.sendline("中国的首都是哪里？")
    child.expect("ChatGLM: ")
    child.expect("you\\): ")
    child.sendline("clear")
    child.expect("'clear' resets the conversation")
    child.expect("you\\): ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_client_one_shot_and_unreachable_server(server):
    import subprocess

    ok = subprocess.run([sys.executable, "-m", "serving.client", "--url", server.url, "--api_key", KEY, "--prompt",
                         "hi", "--max_tokens", "4"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run([sys.executable, "-m", "serving.client", "--url", "http://127.0.0.1:9", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "cannot reach the server" in down.stderr and "Traceback" not in down.stderr


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def test_a_real_browser_sees_the_reply_grow(server):
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/ui/", wait_until="load")
            page.locator("textarea").first.wait_for(timeout=60_000)
            page.get_by_label("API key").fill(KEY)
            # Record every length the reply text takes, as the page renders it (polling could miss them).
            page.evaluate("""() => {
                window.__lens = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll('[data-testid="bot"]');
                    if (bots.length) window.__lens.push(bots[bots.length - 1].innerText.length);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            box = page.locator("textarea").first
            box.fill("List two colors.")
            box.press("Enter")
            bot = page.locator('[data-testid="bot"]').last
            bot.wait_for(timeout=60_000)
            last, stable_since = -1, time.time()
            deadline = time.time() + 90
            while time.time() < deadline and time.time() - stable_since < 2:
                n = len(bot.inner_text())
                if n != last:
                    last, stable_since = n, time.time()
                time.sleep(0.1)
            grown = sorted(set(page.evaluate("() => window.__lens")))
            assert len(grown) >= 3 and grown[-1] > 0, grown  # seen at several lengths: it streamed
            assert "API key" not in bot.inner_text()
        finally:
            browser.close()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_model):
    # The engine in its own process here (as on a GPU): the limits are then checked on the replica's side.
    app = ServeApp(tmp_path_factory.mktemp("serve-small"), model=str(tiny_model), max_num_seqs="2",
                   max_queued_requests="2", ui="false", engine_process="true").start()
    yield app
    app.stop()


def test_beyond_the_queue_a_request_gets_429_with_retry_after_and_later_succeeds(small_server):
    url = small_server.url

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            busy = [asyncio.create_task(_stream(client, url, i, 400)) for i in range(4)]  # 2 running + 2 waiting
            while httpx.get(url + "/health").json()["running"] < 2 or httpx.get(url + "/health").json()["waiting"] < 2:
                await asyncio.sleep(0.05)
            fifth = await client.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True})
            return fifth, await asyncio.gather(*busy)

    fifth, busy = asyncio.run(main())
    assert fifth.status_code == 429, fifth.text
    assert int(fifth.headers["retry-after"]) >= 1
    assert fifth.json()["error"]["type"] == "rate_limit_error" and "max_queued_requests 2" in fifth.json()["error"]["message"]
    assert all(b["status"] == 200 and b["usage"]["completion_tokens"] == 400 for b in busy)
    ok = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200


def test_the_terminal_client_prints_no_control_characters():
    from serving.client import printable

    # A random or broken model can emit ESC sequences; a terminal would run them.
    assert printable("a\x1b[31mb\x07c\x7f\td\ne\r") == "a[31mbc\td\ne\r"


def test_an_event_stays_one_line_whatever_characters_the_reply_holds():
    from serving.api import sse_json

    # Every character str.splitlines (and httpx's aiter_lines) breaks on; JSON leaves U+0085/2028/2029 raw.
    text = "a\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029b 北京"
    line = sse_json({"delta": {"content": text}})
    assert line.splitlines() == [line] and json.loads(line)["delta"]["content"] == text
    assert "北京" in line  # UTF-8 as it is, not \u-escaped


def test_evaluate_via_url_gives_the_greedy_scores_of_the_loaded_model(server, tiny_model, tmp_path):
    from conftest import run_job

    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": q, "output": a} for q, a in [
        ("中国的首都是哪里？", "北京。"), ("List two colors.", "1. red\n2. blue"), ("你好", "你好！"),
        ("Translate into Chinese.", "猫"), ("计算 1 加 2", "1 加 2 等于 3。")]], ensure_ascii=False))
    common = ["--data_path", str(data), "--max_new_tokens", "16", "--mlflow_tracking_uri",
              f"sqlite:///{tmp_path / 'mlflow.db'}"]

    def scores(*args: str) -> list[str]:
        proc = run_job("jobs/evaluate.py", *args, *common, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        return lines[lines.index(next(x for x in lines if x.startswith("model "))) + 2].split()[-6:]

    served = scores("--via_url", server.url, "--api_key", KEY)
    loaded = scores("--model", str(tiny_model))
    assert served == loaded  # every score and the mean reply length, to two decimals


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_client_leaving_mid_read_ends_the_stream_quietly(wrapped):
    """Ray Serve can report a client's hang-up by raising its TaskCancelledError from the app's `receive()`
    (the replica's background read of the request was cancelled). The ingress takes that for the disconnect
    it is: a streaming response ends without an error for Ray to log (seen once in CI: Ray logged the
    cancelled request as "Request failed"). Without the middleware, the same hang-up escapes as an error."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray.exceptions import TaskCancelledError

    from serving.api import ClientLeftIsADisconnect

    app = FastAPI()

    @app.middleware("http")  # as the real ingress: a body-limit middleware around the routes
    async def passthrough(request, call_next):
        return await call_next(request)

    @app.post("/stream")
    async def stream():
        async def tokens():
            for i in range(100):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.01)
        return StreamingResponse(tokens(), media_type="text/event-stream")

    if wrapped:
        app.add_middleware(ClientLeftIsADisconnect)

    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        if reads == 1:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(0.05)  # the client leaves while the replica waits for its next message
        raise TaskCancelledError()

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/stream", "raw_path": b"/stream", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555), "root_path": "", "app": app}
    if wrapped:
        asyncio.run(app(scope, receive, send))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        assert 0 < len(bodies) < 100  # cut short by the hang-up, not streamed to the end
    else:
        with pytest.raises(BaseException) as err:
            asyncio.run(app(scope, receive, send))
        assert "TaskCancelledError" in repr(err.value)


def test_nothing_the_app_starts_listens_beyond_loopback(server):
    """With the default host, every listening socket of `serve run` and of what it started (Ray's GCS, raylet,
    dashboard agent, workers, the Serve proxy and replicas, the engine process) is bound to loopback."""
    import psutil

    root = psutil.Process(server.proc.pid)
    procs = [root, *root.children(recursive=True)]
    procs += [p for p in psutil.process_iter() if p not in procs and _session_of(p) == root.pid]
    listening = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert any(port == server.port for _, _, port in listening)  # the check sees the app's own port
    wide = [s for s in listening if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not wide, f"listening beyond loopback: {wide}"


def _session_of(p) -> int | None:
    import os

    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None
