"""How long the server takes to heal after its engine dies: `serve run serving:app`, a streamed reply, then
SIGKILL of the engine process (as the kernel's OOM killer or a fatal CUDA error would end it).

    python bench/serve_recovery.py --tokenizers DIR --out bench/results/serve_recovery.json           # GPU
    python bench/serve_recovery.py --model models/tiny-chatglm2 --device cpu \\
        --out bench/results/serve_recovery_cpu.json                                                   # CPU

With no --model, a ChatGLM2-6B-shaped model with random weights is built on the GPU (bench/gpu_models.py).
The engine runs in its own process (`engine_process=true`, the GPU default). A client polls every 0.25 s
with a short non-streamed request; the rows say how the cut stream ended, when the first 503 came, and when
requests answered 200 again (the replica replaced and the model loaded again). Prints a table; --out writes
the rows with the command, GPU and versions.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_throughput import Server, add_server_args, served_model, versions  # noqa: E402

POLL_S = 0.25


def engine_process(server: Server):
    """The engine process of this server's model replica (a multiprocessing child of the ChatModel actor)."""
    import psutil

    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "multiprocessing.spawn" in " ".join(child.cmdline()) and "ChatModel" in child.parent().name():
                return child
        except psutil.Error:
            continue
    raise RuntimeError("no engine process found under serve run (is engine_process=true?)")


def one_kill(url: str, server: Server, tokens: int) -> dict:
    import httpx

    engine = engine_process(server)
    short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    seen: list[tuple[float, int, str]] = []
    stop, killed = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = httpx.post(url + "/v1/chat/completions", json=short, timeout=60)
                code = "" if r.status_code == 200 else r.json()["error"].get("code") or ""
                seen.append((t, r.status_code, code))
            except httpx.HTTPError as err:
                seen.append((t, 0, type(err).__name__))
            time.sleep(POLL_S)

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "min_tokens": tokens,
            "stream": True}
    lines = []
    poller = threading.Thread(target=poll, daemon=True)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 4:
                    poller.start()
                    killed.append(time.monotonic())
                    engine.send_signal(signal.SIGKILL)
    end = json.loads(lines[-2]) if len(lines) > 1 and lines[-1] == "[DONE]" else {}
    deadline = killed[0] + 600
    while time.monotonic() < deadline and not any(t > killed[0] and s == 200 for t, s, _ in seen):
        time.sleep(POLL_S)
    stop.set()
    poller.join(timeout=90)
    t0 = killed[0]
    first_503 = next((max(0.0, t - t0) for t, s, _ in seen if s == 503), None)
    back = next((t - t0 for t, s, _ in seen if s == 200 and t > t0 + (first_503 or 0)), None)
    codes = sorted({s for _, s, _ in seen})
    return {"stream_end": (end.get("error") or {}).get("code") or end.get("choices", [{}])[0].get("finish_reason"),
            "stream_ended_with_done": lines[-1:] == ["[DONE]"], "first_503_s": round(first_503, 2) if first_503 is not None else None,
            "recovered_s": round(back, 2) if back is not None else None, "statuses_seen": codes,
            "reasons_503": sorted({c for _, s, c in seen if s == 503}), "polls": len(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(ap)
    ap.add_argument("--kills", type=int, default=2, help="engine kills, one after another recovery")
    ap.add_argument("--tokens", type=int, default=1024, help="the streamed reply that is cut")
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.workdir)
    model = served_model(args)
    from bench import portable_command

    command = portable_command("serve_recovery.py", args)
    app = {"model": model, "device": args.device, "bits": args.bits, "engine_process": "true"}
    t0 = time.time()
    server = Server(app, work / "serve-recovery.log")
    rows = []
    try:
        server.wait()
        startup = round(time.time() - t0, 1)
        print(f"up in {startup} s", flush=True)
        for k in range(args.kills):
            row = {"kill": k + 1, **one_kill(server.url, server, args.tokens)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    print(f"\n{'kill':>4}{'stream ended':>16}{'[DONE]':>8}{'first 503 s':>13}{'200 again s':>13}  statuses")
    for r in rows:
        print(f"{r['kill']:>4}{str(r['stream_end']):>16}{str(r['stream_ended_with_done']):>8}"
              f"{str(r['first_503_s']):>13}{str(r['recovered_s']):>13}  {r['statuses_seen']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shown = {**app, "model": Path(model).name if args.model is None else args.model}
        Path(args.out).write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"),
                                              "versions": versions(), "startup_s": startup, "app": shown,
                                              "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
