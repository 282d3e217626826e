"""Several fine-tunes on one base, served straight from MLflow (real MLflow server, real Serve, real HTTP):
two fine-tunes of the tiny model on different data, registered adapter-only, chosen per request by `model`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, run_job
from mlflow_server import MlflowServer
from serve_app import ServeApp
from test_finetune import run_id_of

pytestmark = pytest.mark.slow

URL = "/v1/chat/completions"
QUESTIONS = ["计算 3 加 4", "Translate into Chinese.\ncat", "中国的首都是哪里？", "List two colors."]
DATA = {  # two fine-tunes that should reply differently
    "sums": [{"instruction": f"计算 {a} 加 {b}", "output": f"{a} 加 {b} 等于 {a + b}。"} for a in range(1, 6) for b in (2, 4)],
    "words": [{"instruction": "Translate into Chinese.", "input": w, "output": z} for w, z in
              [("cat", "猫"), ("dog", "狗"), ("red", "红色"), ("tea", "茶"), ("sun", "太阳")]] * 2,
}


def finetune(env, data: str) -> str:
    path = env["root"] / f"{data}.json"
    path.write_text(json.dumps(DATA[data], ensure_ascii=False))
    proc = run_job("jobs/finetune.py", "--base_model", str(env["model"]), "--data_path", str(path), "--eval_ratio",
                   "0.2", "--bits", "4", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
                   "--learning_rate", "2e-2", "--warmup_steps", "1", "--max_steps", "10", "--eval_steps", "5",
                   "--max_tokens_per_batch", "128", "--max_source_length", "64", "--max_target_length", "64",
                   "--num_workers", "1", "--cpus_per_worker", "1", "--gradient_checkpointing", "false",
                   "--eval_generate_samples", "0", "--output_dir", str(env["root"] / "runs"), "--run_name", data,
                   "--mlflow_tracking_uri", env["server"].uri, "--experiment_name", "adapters",
                   env={"RAY_ADDRESS": ""}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_id_of(proc)


def register_adapters(env, runs: dict[str, str]) -> None:
    """jobs/merge.py --adapter_only for each {registered name: run id}, side by side (no Ray: two processes)."""
    procs = [subprocess.Popen([sys.executable, "jobs/merge.py", "--mlflow_tracking_uri", env["server"].uri, "--run_id",
                               run_id, "--adapter_only", "--registered_model", name, "--output_dir",
                               str(env["root"] / f"out-{name}")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name, run_id in runs.items()]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("adapters")
    server = MlflowServer(root).start()
    env = {"root": root, "server": server, "model": tiny_model}
    # The two jobs side by side (each its own local Ray): on 2 cores mostly waiting on start-up (39 s together).
    with ThreadPoolExecutor(len(DATA)) as pool:
        env["runs"] = dict(zip(DATA, pool.map(lambda data: finetune(env, data), DATA)))
    register_adapters(env, {"tiny-sums": env["runs"]["sums"], "tiny-words": env["runs"]["words"]})
    # The engine in its own process, as on a GPU: adapters cross the pipe, the pool lives in the child.
    app = ServeApp(root, env={"MLFLOW_TRACKING_URI": server.uri}, model=str(tiny_model), engine_process="true",
                   adapters="sums=models:/tiny-sums@champion", max_loras="2", max_lora_rank="16",
                   tracking_uri=server.uri).start(timeout=240)
    env["app"] = app
    yield env
    app.stop()
    server.stop()


def chat(url: str, question: str, model: str | None, max_tokens: int = 12) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens}
    if model is not None:
        body["model"] = model
    return httpx.post(url + URL, json=body, timeout=120)


def merged_replies(env, adapter_folder, max_tokens: int = 12) -> list[str]:
    """The greedy replies of the adapter merged into its base (fp32), as jobs/evaluate.py generates them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import Conversation
    from common.generation import generate_replies

    base = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    model = base if adapter_folder is None else PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(env["model"])
    return generate_replies(model.eval(), tok, "chatglm2", [Conversation(history=[], query=q) for q in QUESTIONS],
                            "cpu", max_tokens, batch_size=1)


@pytest.fixture(scope="module")
def expected(env):
    from common.registry import download_version

    folders = {"base": None, "sums": download_version("models:/tiny-sums@champion", env["server"].uri)[0],
               "words": download_version("models:/tiny-words/1", env["server"].uri)[0]}
    return {name: merged_replies(env, folder) for name, folder in folders.items()}


def test_each_adapter_replies_as_its_own_merged_model_by_name_run_or_registry_uri(env, expected):
    url = env["app"].url
    names = {"base": [None, str(env["model"])], "sums": ["sums", "models:/tiny-sums/1"],
             "words": [f"runs:/{env['runs']['words']}", "models:/tiny-words@champion"]}
    for which, models in names.items():
        for model in models:
            got = [chat(url, q, model) for q in QUESTIONS]
            assert all(r.status_code == 200 for r in got), [r.text for r in got]
            assert [r.json()["choices"][0]["message"]["content"] for r in got] == expected[which], (which, model)
            assert got[0].json()["model"] == (model or str(env["model"]))
    # the fine-tunes differ from the base and from each other: the equalities above say something
    assert len({tuple(v) for v in expected.values()}) == 3


def test_mixed_concurrent_requests_give_the_replies_of_the_same_requests_alone(env, expected):
    url = env["app"].url
    jobs = [(q, m) for q in QUESTIONS for m in (None, "sums", "models:/tiny-words/1")] * 2

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(q, m):
                body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 12,
                        **({"model": m} if m else {})}
                return (await client.post(url + URL, json=body)).json()["choices"][0]["message"]["content"]
            return await asyncio.gather(*(one(q, m) for q, m in jobs))

    which = {None: "base", "sums": "sums", "models:/tiny-words/1": "words"}
    assert asyncio.run(all_at_once()) == [expected[which[m]][QUESTIONS.index(q)] for q, m in jobs]


def test_models_lists_the_base_the_configured_and_the_loaded_adapters(env):
    chat(env["app"].url, QUESTIONS[0], "models:/tiny-words/1")
    data = httpx.get(env["app"].url + "/v1/models", timeout=30).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert data[0]["id"] == str(env["model"]) and by_id["sums"]["source"] == "models:/tiny-sums@champion"
    assert by_id["models:/tiny-words/1"]["parent"] == str(env["model"]) and by_id["models:/tiny-words/1"]["loaded"]
    metrics = httpx.get(env["app"].url + "/metrics", timeout=30).text
    assert "glmops_adapter_loads_total" in metrics and "glmops_adapter_load_seconds_count" in metrics


def test_unknown_adapter_is_a_404_that_says_what_exists_and_other_mistakes_are_400s(env, tmp_path):
    from mlflow import MlflowClient

    url = env["app"].url
    r = chat(url, QUESTIONS[0], "summs")
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert "'sums'" in err["message"] and "runs:/<run_id>" in err["message"]
    assert chat(url, QUESTIONS[0], "models:/no-such-model/1").status_code == 404
    assert chat(url, QUESTIONS[0], "runs:/0123456789abcdef0123456789abcdef").status_code == 404
    # a run without an adapter: 400 naming the run
    client = MlflowClient(env["server"].uri)
    empty = client.create_run(client.get_experiment_by_name("adapters").experiment_id).info.run_id
    r = chat(url, QUESTIONS[0], f"runs:/{empty}")
    assert r.status_code == 400 and empty in r.json()["error"]["message"] and "no adapter" in r.json()["error"]["message"]
    # an adapter of another base: 400 saying which base it needs
    other = tmp_path / "other-base"
    _adapter_of_another_base(other)
    version = _register_folder(env, other, "tiny-other-base")
    r = chat(url, QUESTIONS[0], f"models:/tiny-other-base/{version}")
    assert r.status_code == 400 and "was trained on base some-org/another-base" in r.json()["error"]["message"]
    assert chat(url, QUESTIONS[0], "sums").status_code == 200  # and the server goes on


def _adapter_of_another_base(folder) -> None:
    """A registered-adapter layout (glmops.json with a base hash) for a base this server does not serve."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    base = GlmForCausalLM(GlmConfig(vocab_size=1024, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, pad_token_id=0))
    torch.manual_seed(0)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    (folder / "glmops.json").write_text(json.dumps({"kind": "adapter", "base_model": "some-org/another-base",
                                                    "base_hash": "0" * 64, "family": "chatglm2"}))


def test_an_alias_moved_to_another_version_is_followed_once_looked_up_again(env, monkeypatch):
    from mlflow import MlflowClient

    from serving import adapters
    from serving.adapters import AdapterCatalog

    catalog = AdapterCatalog("base", env["model"], {"s": "models:/tiny-moving@champion"}, env["server"].uri, 16, True)
    first = _register_folder(env, env["root"] / "out-tiny-sums", "tiny-moving")
    client = MlflowClient(env["server"].uri)
    client.set_registered_model_alias("tiny-moving", "champion", first)
    catalog.resolve_configured()
    before = asyncio.run(catalog.resolve("s")).folder
    second = _register_folder(env, env["root"] / "out-tiny-words", "tiny-moving")
    client.set_registered_model_alias("tiny-moving", "champion", second)
    assert asyncio.run(catalog.resolve("s")).folder == before  # within ALIAS_TTL_S: the version it had
    monkeypatch.setattr(adapters, "ALIAS_TTL_S", 0.0)
    after = asyncio.run(catalog.resolve("s")).folder
    assert after != before and (Path(after) / "adapter_model.safetensors").read_bytes() == \
        (env["root"] / "out-tiny-words" / "adapter_model.safetensors").read_bytes()


def _register_folder(env, folder, name: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["server"].uri)
    client = MlflowClient(env["server"].uri)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("adapters").experiment_id) as run:
        mlflow.log_artifacts(str(folder), "model")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version


def test_the_terminal_client_and_the_web_page_choose_an_adapter_by_name(env, expected):
    from gradio_client import Client

    url = env["app"].url
    proc = run_job("-m", "serving.client", "--url", url, "--prompt", QUESTIONS[0], "--model", "sums",
                   "--temperature", "0", "--max_tokens", "12")
    assert proc.returncode == 0 and proc.stdout == expected["sums"][0] + "\n", proc.stderr
    proc = run_job("-m", "serving.client", "--url", url, "--prompt", QUESTIONS[0], "--model", "summs")
    assert proc.returncode != 0 and "(404)" in proc.stderr and "'sums'" in proc.stderr
    for model, which in (("sums", "sums"), (str(env["model"]), "base")):  # a new page each: no history between
        page = Client(url + "/ui/", verbose=False)
        assert page.predict(QUESTIONS[1], 12, 0.7, 0.0, model, "", api_name="/respond") == expected[which][1]


def test_evaluate_scores_served_adapters_side_by_side_in_one_run(env):
    from mlflow import MlflowClient

    proc = run_job("jobs/evaluate.py", "--via_url", env["app"].url, "--compare", "base,sums,models:/tiny-words/1",
                   "--data_path", str(env["root"] / "sums.json"), "--max_samples", "4", "--max_new_tokens", "16",
                   "--mlflow_tracking_uri", env["server"].uri, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("=== scores")[1].splitlines()
    head = table[1].split()
    rows = {line.split()[0]: dict(zip(head[1:], map(float, line.split()[1:]))) for line in table[3:6]}
    assert set(rows) == {"base", "sums", "models:/tiny-words/1"}
    # trained on these records: it scores above the base
    assert rows["sums"]["rouge-l_jieba"] > rows["base"]["rouge-l_jieba"], proc.stdout
    run_id = proc.stdout.split("MLflow run id:")[1].split()[0]
    tags = MlflowClient(env["server"].uri).get_run(run_id).data.tags
    assert tags["served_model [sums]"] == "sums"
