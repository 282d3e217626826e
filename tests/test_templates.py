"""Chat templates: the ids and labels each family's own code produces, and exact truncation."""

from __future__ import annotations

import pytest
from conftest import reference_cases, reference_tokenizer

from common.data import Conversation
from common.templates import IGNORE, ExampleTooLong, get_template

FAMILY = {"chatglm1": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3"}


def _conversation_from_case(version: str, case: dict) -> Conversation:
    history, system = case["history"], None
    if version == "chatglm3":
        if history and history[0]["role"] == "system":
            system, history = history[0]["content"], history[1:]
        history = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history), 2)]
    return Conversation(history=[tuple(t) for t in history], query=case["query"], system=system)


def _prompt_cases(version: str):
    cases = reference_cases(version)["chat_prompt"]
    out = []
    for name, case in cases.items():
        if name.startswith("_") or name == "stream_continuation":
            continue
        # Tool calls and the observation role are ChatGLM3 agent features our conversations do not model.
        if name in ("system_with_tools", "observation_role"):
            continue
        out.append((name, case))
    return out


@pytest.mark.parametrize("version", ["chatglm1", "chatglm2", "chatglm3"])
def test_generation_prompt_ids_equal_the_original_chat(version):
    tok = reference_tokenizer(version)
    template = get_template(FAMILY[version])
    cases = _prompt_cases(version)
    assert cases
    for name, case in cases:
        assert template.prompt(tok, _conversation_from_case(version, case)) == case["input_ids"], name


@pytest.mark.parametrize("version", ["chatglm1", "chatglm2", "chatglm3"])
def test_training_ids_and_labels_equal_thudms_finetune_scripts(version):
    tok = reference_tokenizer(version)
    ref = reference_cases(version)["training_labels"]
    if version == "chatglm3":
        msgs = ref["conversation"]
        conv = Conversation(history=[(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 2, 2)],
                            query=msgs[-2]["content"], answer=msgs[-1]["content"])
        # THUDM's ChatGLM3 script learns every assistant message.
        enc = get_template("chatglm3").encode(tok, conv, 4096, 4096, train_on_history=True)
    else:
        history = reference_cases(version)["chat_prompt"]["two_turn_history"]["history"]
        conv = Conversation(history=[tuple(t) for t in history], query="晚上睡不着应该怎么办", answer=ref["answer"])
        enc = get_template(FAMILY[version]).encode(tok, conv, 4096, 4096)
    assert enc.input_ids == ref["input_ids"]
    assert enc.labels == ref["labels"]


def test_chatglm1_sends_a_bare_first_query_and_appends_gmask_sop():
    tok = reference_tokenizer("chatglm1")
    ids = get_template("chatglm").prompt(tok, Conversation(history=[], query="你好"))
    assert ids[-2:] == [130001, 130004]
    assert tok.decode(ids[:-2]) == "你好"


def test_stop_tokens_per_family():
    assert get_template("chatglm").stop_token_ids(reference_tokenizer("chatglm1")) == [130005]
    assert get_template("chatglm2").stop_token_ids(reference_tokenizer("chatglm2")) == [2]
    assert get_template("chatglm3").stop_token_ids(reference_tokenizer("chatglm3")) == [2, 64795, 64797]


# -- the same rules on the tiny model's tokenizer (no reference data needed) ---------------------------

def _conv(n_history: int, answer: str = "答案是四。") -> Conversation:
    return Conversation(history=[(f"问题{i}", f"回答{i}") for i in range(n_history)], query="二加二等于几？",
                        answer=answer)


def test_only_the_last_answer_and_its_end_token_are_learned_by_default(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = get_template("chatglm2").encode(tok, _conv(2))
    supervised = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(supervised[:-1]) == "答案是四。"
    assert supervised[-1] == tok.eos_token_id
    assert enc.labels[: enc.meta["answer_start"]] == [IGNORE] * enc.meta["answer_start"]


def test_train_on_history_learns_every_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = get_template("chatglm2").encode(tok, _conv(2), train_on_history=True)
    supervised = tok.decode([t for t in enc.labels if t != IGNORE])
    assert "回答0" in supervised and "回答1" in supervised and "答案是四。" in supervised
    assert "问题0" not in supervised and "二加二" not in supervised


def test_oldest_history_is_dropped_first_to_fit_the_prompt_budget(tiny_tokenizer):
    tok = tiny_tokenizer
    t = get_template("chatglm2")
    full = len(t.prompt(tok, _conv(3)))
    without_oldest = len(t.prompt(tok, Conversation(history=_conv(3).history[1:], query=_conv(3).query)))
    enc = t.encode(tok, _conv(3), max_source_length=without_oldest, max_target_length=64)
    assert enc.dropped_rounds == 1 and full > without_oldest
    text = tok.decode(enc.input_ids)
    assert "问题0" not in text and "问题1" in text and "[Round 1]" in text  # rounds renumbered from 1


def test_a_question_over_the_budget_is_rejected_not_cut(tiny_tokenizer):
    with pytest.raises(ExampleTooLong):
        get_template("chatglm2").encode(tiny_tokenizer, _conv(0), max_source_length=5, max_target_length=64)


def test_a_long_answer_is_cut_to_the_target_budget_without_end_token(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = get_template("chatglm2").encode(tok, _conv(0, answer="很长的回答。" * 30), max_target_length=10)
    assert enc.answer_truncated
    assert len(enc.input_ids) - enc.meta["answer_start"] == 10
    assert enc.input_ids[-1] != tok.eos_token_id


def test_tiny_models_jinja_template_matches_the_chatglm2_template(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = _conv(2)
    msgs = []
    for q, a in conv.history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": conv.query})
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(out["input_ids"]) if hasattr(out, "keys") else list(out)
    assert ids == get_template("chatglm2").prompt(tok, conv)


def test_hf_template_supervises_the_rendered_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = get_template("hf").encode(tok, _conv(1), train_on_history=True)
    supervised = tok.decode([t for t in enc.labels if t != IGNORE])
    assert "答案是四。" in supervised and "回答0" in supervised and "问题0" not in supervised


def test_unknown_template_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown chat template 'llama'"):
        get_template("llama")
