"""Tool calls: records with tools become the ids THUDM's own builders make, and each family's call parses back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import reference_dir, reference_tokenizer

from common.chat_records import messages_conversation
from common.data import check_record, load_dataset, record_to_conversation
from common.models.tiny_model import build_tokenizer
from common.templates import IGNORE, TemplateMismatch, get_template
from common.tool_eval import Malformed, read_reply, reference_text, tool_scores
from common.tools import FORMATS, BadToolCall, ToolCall, tool_format

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((Path(__file__).parent / "reference" / "tools.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def glm4_tok():
    return build_tokenizer(str(ROOT / "data" / "sample.json"), family="glm4")


def _only_last_round(labels: list[int], record: dict, ids: list[int], user_id: int) -> list[int]:
    """THUDM's labels with every round but the last left out (our default, without --train_on_history)."""
    last_user = len(ids) - 1 - ids[::-1].index(user_id)
    return [IGNORE] * (last_user + 1) + labels[last_user + 1:]


@pytest.mark.parametrize("case", REFERENCE["chatglm3"], ids=lambda c: c["name"])
def test_chatglm3_tool_conversations_are_token_exact_with_thudms_builder(case):
    if not reference_dir("chatglm3").is_dir():
        pytest.skip("../shared/reference/chatglm3 is absent")
    tok = reference_tokenizer("chatglm3")
    template = get_template("chatglm3")
    conv = record_to_conversation(case["record"])
    enc = template.encode(tok, conv, 4096, 4096, train_on_history=True)
    assert enc.input_ids == case["input_ids"]
    assert enc.labels == case["labels"]
    last = template.encode(tok, conv, 4096, 4096, train_on_history=False)
    user = tok.convert_tokens_to_ids("<|user|>")
    assert last.labels == _only_last_round(case["labels"], case["record"], case["input_ids"], user)
    prompt = messages_conversation(case["prompt_after_last_result"]["record"], prompt=True)
    assert template.prompt(tok, prompt) == case["prompt_after_last_result"]["input_ids"]


@pytest.mark.parametrize("case", REFERENCE["glm4"], ids=lambda c: c["name"])
def test_glm4_tool_conversations_are_token_exact_with_its_chat_template(case, glm4_tok):
    tok = glm4_tok
    template = get_template("glm4")
    conv = record_to_conversation(case["record"])
    enc = template.encode(tok, conv, 4096, 4096, train_on_history=True)
    assert tok.decode(enc.input_ids) == case["text"]
    assert enc.input_ids == tok(case["text"], add_special_tokens=False)["input_ids"]
    # glm-4's fine-tuning script: messages tokenized one by one, a token labelled after a learned message's token.
    ids, flags = [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("<sop>")], [False, False]
    for m in case["messages"]:
        piece = tok(m["text"], add_special_tokens=False)["input_ids"]
        ids, flags = ids + piece, flags + [m["learned"]] * len(piece)
    ids, flags = ids + [tok.convert_tokens_to_ids("<|endoftext|>")], [False] + flags
    assert enc.input_ids == ids
    assert enc.labels == [t if f else IGNORE for t, f in zip(ids, flags)]
    prompt = messages_conversation(case["prompt_after_last_result"]["record"], prompt=True)
    assert template.prompt(tok, prompt) == tok(case["prompt_after_last_result"]["text"],
                                               add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_each_familys_call_parses_back_to_the_same_call(family):
    fmt = tool_format(family)
    call = ToolCall("book_train", {"from": "北京", "to_city": "It's \"far\", x=1", "note": "a, from=b (class=c)",
                                   "class": "二等座", "date": "2026-12-05",
                                   "seats": 2, "window": True, "extra": {"meal": None, "bags": [1, 2.5]}})
    metadata, text = fmt.call_message(call)
    assert fmt.parse(f"{metadata}\n{text}") == call
    assert fmt.parse("\n北京今天晴。") is None  # an empty metadata line: a plain reply
    with pytest.raises(BadToolCall):
        fmt.parse(f"{metadata}\n{text[: len(text) // 2]}")  # cut off in the middle
    with pytest.raises(BadToolCall):
        fmt.parse("not a name\n{}")


def test_chatglm3_calls_are_read_as_literals_never_run():
    with pytest.raises(BadToolCall):
        tool_format("chatglm3").parse("f\n```python\ntool_call(x=__import__('os').getcwd())\n```")


CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
USER = {"role": "user", "content": "北京天气？"}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "晴"}
REPLY = {"role": "assistant", "content": "晴。"}


@pytest.mark.parametrize("record, field, found", [
    ({"tools": TOOLS, "messages": [USER, {**CALL, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: 北京}"}}]}, RESULT, REPLY]},
     "messages[1].tool_calls[0].function.arguments", "not JSON"),
    ({"tools": TOOLS, "messages": [USER, RESULT, REPLY]}, "messages[1].role", "no call before it"),
    ({"tools": TOOLS, "messages": [USER, {"role": "robot", "content": "x"}]}, "messages[1].role", "'robot'"),
    ({"tools": TOOLS, "messages": [USER, CALL, RESULT]}, "messages", "a tool result last"),
    ({"tools": TOOLS, "messages": [USER, {**CALL, "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},
                                   RESULT, REPLY]}, "messages[1].tool_calls[0].function.name", "'get_time'"),
    ({"tools": TOOLS, "messages": [USER, CALL, {**RESULT, "tool_call_id": "c9"}, REPLY]},
     "messages[2].tool_call_id", "'c9'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}], "messages": [USER, REPLY]},
     "tools[0].function.name", "'get weather'"),
    ({"tools": "[{", "messages": [USER, REPLY]}, "tools", "does not parse"),
    ({"conversations": [{"from": "human", "value": "北京天气？"}, {"from": "observation", "value": "晴"},
                        {"from": "gpt", "value": "晴。"}]}, "conversations[1].from", "no call before it"),
    ({"conversations": [{"from": "human", "value": "北京天气？"},
                        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": [1]}"},
                        {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "晴。"}]},
     "conversations[1].value.arguments", "list"),
])
def test_malformed_tool_records_name_the_field_and_what_was_found(record, field, found):
    problems = check_record(7, record)
    assert [p.field for p in problems] == [field]
    assert found in problems[0].found
    assert problems[0].describe("data.jsonl").startswith(f"data.jsonl: record 7, field {field!r}: expected ")


def test_sharegpt_and_openai_records_give_the_same_conversation():
    sharegpt = {"tools": json.dumps([TOOLS[0]["function"]]), "conversations": [
        {"from": "human", "value": "北京天气？"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}})},
        {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "晴。"}]}
    openai = {"tools": TOOLS, "messages": [USER, CALL, RESULT, REPLY]}
    assert record_to_conversation(sharegpt) == record_to_conversation(openai)
    assert record_to_conversation(openai).answer == [{"call": {"name": "get_weather", "arguments": {"city": "北京"}}},
                                                     {"observation": "晴"}, {"reply": "晴。"}]


def test_templates_without_a_tool_format_refuse_tool_data():
    conv = record_to_conversation({"tools": TOOLS, "messages": [USER, CALL, RESULT, REPLY]})
    tok = build_tokenizer(str(ROOT / "data" / "sample.json"))
    with pytest.raises(TemplateMismatch, match="chatglm3 or glm4"):
        get_template("chatglm2").encode(tok, conv)


def test_the_bundled_tool_set_loads_and_every_record_learns_a_call_or_a_reply(glm4_tok):
    data = load_dataset(str(ROOT / "data" / "tools.jsonl"))
    convs = data.conversations()
    assert len(convs) >= 150 and not data.skipped
    calls = [c for c in convs if isinstance(c.answer, list)]
    assert {s["call"]["name"] for c in calls for s in c.answer if "call" in s} == {
        "get_weather", "convert_currency", "book_train"}
    assert len(calls) > len(convs) // 2
    for conv in convs[:20]:
        enc = get_template("glm4").encode(glm4_tok, conv)
        assert any(x != IGNORE for x in enc.labels)


def test_tool_scores_on_hand_made_replies():
    weather = {"tools": TOOLS, "messages": [USER, CALL, RESULT, REPLY]}
    chat = {"tools": TOOLS, "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    convs = [record_to_conversation(r) for r in (weather, weather, weather, weather, weather, chat, chat)]
    fmt = tool_format("chatglm3")
    right = "\n".join(fmt.call_message(ToolCall("get_weather", {"city": "北京"})))
    raw = [right,                                                              # right
           "\n".join(fmt.call_message(ToolCall("get_time", {"city": "北京"}))),  # wrong name
           "\n".join(fmt.call_message(ToolCall("get_weather", {"city": "上海"}))),  # wrong arguments
           "\n北京今天晴。",                                                    # no call where one was expected
           "get_weather\n```python\ntool_call(city=\n```",                       # a call that does not parse
           right,                                                              # a call where none was expected
           "\n你好！"]                                                          # right: text
    replies = [read_reply("chatglm3", r) for r in raw]
    assert replies[0] == ToolCall("get_weather", {"city": "北京"}) and replies[3] == "北京今天晴。"
    assert isinstance(replies[4], Malformed)
    scores = tool_scores(convs, replies)
    assert scores == {"tool_name_accuracy": 40.0, "tool_arguments_exact": 20.0, "tool_missed_calls": 40.0,
                      "tool_spurious_calls": 50.0, "tool_malformed_calls": 100 / 7}
    assert tool_scores([record_to_conversation({"instruction": "q", "output": "a"})], ["a"]) == {}
    assert reference_text(convs[0]) == 'get_weather({"city": "北京"})' and reference_text(convs[5]) == "你好！"


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_the_server_holds_a_call_back_until_it_parses_and_sends_a_broken_one_as_text(family):
    from serving.tool_calls import PARSE_FAILURES, ToolReply

    tok = build_tokenizer(str(ROOT / "data" / "sample.json"), family=family)
    template = get_template(family)
    fmt = tool_format(family)
    reply = ToolReply(template, tok, "auto")
    name, text = fmt.call_message(ToolCall("get_weather", {"city": "北京"}))
    assert reply.feed(name[:3]) == [] and reply.feed(f"{name[3:]}\n{text}") == []
    assert reply.finish() == [{"tool_call": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]
    assert reply.finish_reason == "tool_calls"
    plain = ToolReply(template, tok, "auto")
    assert plain.feed("\n北京") == [{"delta": "北京"}] and plain.feed("今天晴。") == [{"delta": "今天晴。"}]
    assert plain.finish() == [] and plain.finish_reason is None
    before = PARSE_FAILURES._value.get()
    broken = ToolReply(template, tok, "auto")
    broken.feed(f"get_weather\n{text[:-6]}")
    assert broken.finish() == [{"delta": f"get_weather\n{text[:-6]}"}]
    assert PARSE_FAILURES._value.get() == before + 1 and broken.finish_reason is None
    named = ToolReply(template, tok, {"type": "function", "function": {"name": "book_train"}})
    assert tok.decode(named.prefix_ids) == "book_train\n"
    named.feed(fmt.call_message(ToolCall("book_train", {"date": "2026-12-08"}))[1])
    assert named.finish() == [{"tool_call": {"name": "book_train", "arguments": '{"date": "2026-12-08"}'}}]
    assert tok.decode(ToolReply(template, tok, "none").prefix_ids) == "\n"
    assert ToolReply(template, tok, "required").banned_first == (tok("\n", add_special_tokens=False)["input_ids"][0],)
