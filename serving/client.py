"""Terminal chat against a running glmops server, streaming the reply as it arrives.

    python -m serving.client [--url http://127.0.0.1:8000] [--api_key KEY]
    python -m serving.client --prompt "你好"                       # answer once, for scripts
    python -m serving.client --model exp7                         # an adapter (a name, runs:/..., models:/...)
    python -m serving.client --model_path models/x [--bits 4]      # the seed's cli_demo habit: serve locally

Commands: `clear` starts a new conversation, `stop` or `exit` quits. History stays on this side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from common.errors import UserError, run_cli

# A reply is model output: control characters (ESC starts terminal escape sequences) are not printed raw.
_UNPRINTABLE = {c: None for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: None}


def printable(text: str) -> str:
    return text.translate(_UNPRINTABLE)


WELCOME = "glmops chat: type a message; 'clear' resets the conversation, 'stop' or 'exit' quits."


def stream_chat(url: str, messages: list[dict], api_key: str | None, max_tokens: int, temperature: float,
                top_p: float, out=sys.stdout, model: str | None = None) -> str:
    """POST one streamed chat request; print deltas as they come; return the whole reply."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p}
    if model:
        body["model"] = model
    reply = ""
    try:
        with httpx.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers,
                          timeout=httpx.Timeout(10.0, read=300.0)) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    msg = resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = resp.text[:300]
                raise UserError(f"the server refused the request ({resp.status_code}): {msg}")
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:  # the server ended the reply (engine failure, timeout, shutdown)
                    out.write("\n")
                    raise UserError(f"the reply was cut short ({event['error'].get('code')}): "
                                    f"{event['error']['message']}")
                delta = event["choices"][0]["delta"].get("content") or ""
                reply += delta
                out.write(printable(delta))
                out.flush()
    except httpx.ConnectError:
        raise UserError(f"cannot reach the server at {url}. Start it with `serve run serving:app` "
                        "(or `make serve`), or pass --url.") from None
    out.write("\n")
    out.flush()
    return reply


def chat_loop(args) -> int:
    history: list[dict] = []
    print(WELCOME)
    while True:
        try:
            text = input("\n用户 (you): ").strip()
        except EOFError:
            return 0
        if text in ("stop", "exit"):
            return 0
        if text == "clear":
            history.clear()
            os.system("clear") if sys.stdout.isatty() and os.environ.get("TERM") else None
            print(WELCOME)
            continue
        if not text:
            continue
        messages = history + [{"role": "user", "content": text}]
        print("\nChatGLM: ", end="", flush=True)
        try:
            reply = stream_chat(args.url, messages, args.api_key, args.max_tokens, args.temperature, args.top_p,
                                model=args.model)
        except UserError as err:
            print(f"\nerror: {err}", file=sys.stderr)
            if "cannot reach" in str(err):
                return 2
            continue
        history = messages + [{"role": "assistant", "content": reply}]


def local_server(model_path: str, bits: int):
    """Serve `model_path` in a local Ray (loopback, free port) for this session; returns (url, shutdown)."""
    import socket

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import ray
    from ray import serve

    from serving import AppArgs, app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"starting a local server for {model_path} ...", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.run(app(AppArgs(model=model_path, bits=bits, port=port)), name="glmops-client", route_prefix="/")

    def shutdown() -> None:
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}", shutdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("GLMOPS_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api_key", default=os.environ.get("GLMOPS_API_KEY"))
    ap.add_argument("--prompt", help="answer this one message and exit")
    ap.add_argument("--model", help="an adapter the server knows (its name, runs:/<run_id>, models:/<name>@<alias>); "
                                    "default: the base")
    ap.add_argument("--model_path", help="serve this model locally for the session (the seed's cli_demo.py)")
    ap.add_argument("--bits", type=int, default=16, choices=(4, 8, 16), help="with --model_path: quantize")
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.95)
    ap.add_argument("--top_p", type=float, default=0.7)
    args = ap.parse_args(argv)
    shutdown = None
    if args.model_path:
        args.url, shutdown = local_server(args.model_path, args.bits)
    try:
        if args.prompt is not None:
            stream_chat(args.url, [{"role": "user", "content": args.prompt}], args.api_key, args.max_tokens,
                        args.temperature, args.top_p, model=args.model)
            return 0
        return chat_loop(args)
    finally:
        if shutdown:
            shutdown()


if __name__ == "__main__":
    run_cli(main)
