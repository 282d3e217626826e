"""Tool calls through the served API with the official `openai` client: a tiny ChatGLM3-format model fine-tuned
on a few tool conversations (real job, real merge, real `serve run`, real HTTP)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import ROOT, run_job
from serve_app import ServeApp

from common.models.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

TOOLS = [json.loads(line) for line in (ROOT / "data" / "tools.jsonl").read_text(encoding="utf-8").splitlines()][0]["tools"]


def record(question: str, name: str, args: dict, result: dict, reply: str) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": reply}]}


DATA = [
    record("北京今天天气怎么样？", "get_weather", {"city": "北京"}, {"temperature": 3, "sky": "晴"}, "北京今天晴，气温 3 度。"),
    record("上海今天天气怎么样？", "get_weather", {"city": "上海"}, {"temperature": 12, "sky": "多云"}, "上海今天多云，气温 12 度。"),
    record("100美元等于多少人民币？", "convert_currency", {"amount": 100, "from": "USD", "to": "CNY"}, {"result": 718.0},
           "100 USD 约等于 718.0 元人民币。"),
    record("帮我订一张2026-12-08从北京到上海的火车票", "book_train",
           {"from_city": "北京", "to_city": "上海", "date": "2026-12-08"}, {"ok": True, "train": "G101"},
           "已为你预订2026-12-08 北京到上海的 G101 次列车。"),
    {"tools": TOOLS, "messages": [{"role": "user", "content": "你好"},
                                  {"role": "assistant", "content": "你好！我可以帮你查天气、换算货币或预订火车票。"}]},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    base = build_tiny_model(str(root / "tiny-chatglm3"), str(ROOT / "data" / "sample.json"), family="chatglm3")
    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DATA), encoding="utf-8")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = run_job("jobs/finetune.py", "--base_model", str(base), "--data_path", str(data), "--eval_data_path", str(data),
                   "--bits", "16", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--learning_rate",
                   "1e-2", "--warmup_steps", "5", "--max_steps", "120", "--max_tokens_per_batch", "4096",
                   "--max_source_length", "512", "--max_target_length", "64", "--num_workers", "1",
                   "--cpus_per_worker", "1", "--gradient_checkpointing", "false", "--eval_generate_samples", "0",
                   "--output_dir", str(root / "runs"), "--mlflow_tracking_uri", uri, env={"RAY_ADDRESS": ""},
                   timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = next(x for x in proc.stdout.splitlines() if x.startswith("MLflow run id:")).split()[3]
    proc = run_job("jobs/merge.py", "--run_id", run_id, "--mlflow_tracking_uri", uri, "--output_dir",
                   str(root / "merged"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    app = ServeApp(root, model=str(root / "merged")).start(timeout=240)
    app.data, app.tracking_uri = data, uri
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def ask(client, question: str, **kw):
    kw = {"tools": TOOLS, **kw}
    return client.chat.completions.create(model="base", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=64, **kw)


def test_a_call_comes_back_as_tool_calls_with_json_arguments(client):
    r = ask(client, "北京今天天气怎么样？")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}


def test_a_streamed_call_is_assembled_from_its_deltas(client):
    stream = ask(client, "100美元等于多少人民币？", stream=True)
    name, arguments, ids, finish, content = "", "", set(), None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.index == 0
            ids.add(call.id) if call.id else None
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(ids) == 1
    assert name == "convert_currency"
    assert json.loads(arguments) == {"amount": 100, "from": "USD", "to": "CNY"}


def test_a_tool_result_fed_back_gives_the_final_answer(client):
    first = ask(client, "北京今天天气怎么样？").choices[0].message
    r = client.chat.completions.create(model="base", tools=TOOLS, temperature=0, max_tokens=64, messages=[
        {"role": "user", "content": "北京今天天气怎么样？"}, first,
        {"role": "tool", "tool_call_id": first.tool_calls[0].id,
         "content": json.dumps({"temperature": 3, "sky": "晴"}, ensure_ascii=False)}])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "北京今天晴，气温 3 度。"


def test_tool_choice_none_gives_text_and_a_named_choice_calls_that_function(client):
    r = ask(client, "北京今天天气怎么样？", tool_choice="none")
    assert r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls
    assert isinstance(r.choices[0].message.content, str)
    r = ask(client, "帮我订一张2026-12-08从北京到上海的火车票",
            tool_choice={"type": "function", "function": {"name": "book_train"}})
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "book_train"
    assert json.loads(call.function.arguments) == {"from_city": "北京", "to_city": "上海", "date": "2026-12-08"}
    r = ask(client, "你好")  # trained to answer this one in text
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.startswith("你好")


def test_malformed_tools_are_a_400_naming_the_field(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "你好", tools=[{"type": "function", "function": {"name": "bad name"}}])
    assert err.value.body["param"] == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "你好", tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert err.value.body["param"] == "tool_choice"
    body = {"messages": [{"role": "user", "content": "你好"}, {"role": "tool", "content": "晴"}], "tools": TOOLS}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    calls = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("glmops_tool_calls_total"))
    assert calls >= 1


def test_the_web_page_shows_a_call_and_reads_the_next_message_as_its_result(server):
    from gradio_client import Client

    from serving.web import tool_conversation

    page = Client(server.url + "/ui/", verbose=False)
    shown = page.predict("北京今天天气怎么样？", 64, 0.7, 0.0, json.dumps(TOOLS, ensure_ascii=False), api_name="/respond")
    assert shown.startswith("🔧 **get_weather**") and '"city": "北京"' in shown
    conv = tool_conversation([("北京今天天气怎么样？", "user"), (shown, "assistant")], '{"temperature": 3, "sky": "晴"}',
                             json.dumps(TOOLS))
    assert conv["query"] == "北京今天天气怎么样？"
    assert conv["pending"] == [{"call": {"name": "get_weather", "arguments": {"city": "北京"}}},
                               {"observation": '{"temperature": 3, "sky": "晴"}'}]


def test_evaluate_scores_the_served_models_calls(server):
    proc = run_job("jobs/evaluate.py", "--via_url", server.url, "--data_path", str(server.data),
                   "--mlflow_tracking_uri", server.tracking_uri, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    head, row = [x for x in proc.stdout.splitlines() if x.startswith(("model", server.url))][-2:]
    scores = dict(zip(head.split()[1:], (float(v) for v in row.split()[1:])))
    assert scores["tool_name_accuracy"] == 100.0 and scores["tool_arguments_exact"] == 100.0
    assert scores["tool_missed_calls"] == 0.0 and scores["tool_spurious_calls"] == 0.0
