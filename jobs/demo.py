"""`make demo`: the whole pipeline on the embedded default, on CPU, with nothing downloaded.

tiny model → dry run → QLoRA fine-tune on a local Ray (2 workers) → merge + register in ./mlflow.db →
base vs fine-tuned scores → serve the registered model with Ray Serve → one question through the terminal client → shut down.
Each step prints the command a user would type.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TRACKING = f"sqlite:///{ROOT / 'mlflow.db'}"
MODEL_URI = "models:/tiny-chatglm2-finetune@champion"
QUESTION = "中国的首都是哪里？"

STEPS = [
    ("validate config and data (dry run)",
     [PY, "jobs/finetune.py", "--config", "configs/finetune-tiny.yaml", "--dry_run"]),
    ("fine-tune with QLoRA on a local Ray cluster (2 workers), tracked in ./mlflow.db",
     [PY, "jobs/finetune.py", "--config", "configs/finetune-tiny.yaml", "--mlflow_tracking_uri", TRACKING]),
    ("merge the best adapter of the demo experiment and register it (alias @champion)",
     [PY, "jobs/merge.py", "--experiment", "glmops-demo", "--output_dir", "models/tiny-chatglm2-finetune",
      "--overwrite", "--dtype", "fp32", "--mlflow_tracking_uri", TRACKING]),
    ("score the base and the fine-tuned model side by side on the sample data (BLEU-4, ROUGE, x100)",
     [PY, "jobs/evaluate.py", "--compare", f"models/tiny-chatglm2,{MODEL_URI}", "--data_path", "data/sample.json",
      "--max_samples", "24", "--max_new_tokens", "24", "--mlflow_tracking_uri", TRACKING]),
]


def _show(cmd: list[str]) -> str:
    return " ".join(c if c != PY else "python" for c in cmd)


def _free_port(preferred: int = 8000) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def trained_answer(question: str) -> str:
    records = json.loads((ROOT / "data" / "sample.json").read_text(encoding="utf-8"))
    return next(r["output"] for r in records if r["instruction"] == question and not r.get("history"))


def serve_and_chat() -> int:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(PY).with_name("serve")), "run", "serving:app", f"model={MODEL_URI}", f"port={port}",
           f"tracking_uri={TRACKING}"]
    print(f"\n=== serve the registered model with Ray Serve\n$ serve run serving:app model={MODEL_URI}", flush=True)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(ROOT / "output" / "demo-serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 180:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    print(f"the server exited; see {log.name}", file=sys.stderr)
                    return 1
                time.sleep(1)
        else:
            print(f"the server did not come up in 180 s; see {log.name}", file=sys.stderr)
            return 1
        print(f"serving at {url} (web chat: {url}/ui/) after {time.time() - t0:.0f} s")
        chat = [PY, "-m", "serving.client", "--url", url, "--prompt", QUESTION, "--max_tokens", "48",
                "--temperature", "0"]
        print(f"\n=== ask it one question through the terminal client\n$ {_show(chat)}")
        print(f"用户 (you): {QUESTION}\nChatGLM: ", end="", flush=True)
        client = subprocess.Popen(chat, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        reply = ""
        while chunk := client.stdout.read(1):  # the reply as it streams
            reply += chunk
            print(chunk, end="", flush=True)
        if client.wait() != 0:
            return client.returncode
        trained = trained_answer(QUESTION)
        verdict = "the reply is the trained answer" if reply.strip() == trained else "the reply differs from it"
        print(f"trained answer (data/sample.json): {trained}   -> {verdict}")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C: Serve removes the app, the local Ray stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print("server stopped.")


def main() -> int:
    os.chdir(ROOT)
    (ROOT / "output").mkdir(exist_ok=True)
    t0 = time.time()
    for title, cmd in STEPS:
        print(f"\n=== {title}\n$ {_show(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"demo stopped: step '{title}' failed", file=sys.stderr)
            return 1
    if serve_and_chat() != 0:
        return 1
    print(f"\ndemo finished in {time.time() - t0:.0f} s.")
    print("look at the runs and the registry:  make mlflow-ui   (then open http://127.0.0.1:5000)")
    print(f"chat with it yourself:              make serve ARGS='model={MODEL_URI}'  then  make chat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
