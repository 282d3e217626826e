"""Write tests/reference/tools.json: tool-call conversations as THUDM's own builders write them.

    python tests/reference/make_tool_reference.py --chatglm3_tokenizer_code T.py --chatglm3_preprocess P.py \\
        --sp_model ../shared/reference/chatglm3/tokenizer.model --glm4_template glm4.jinja

Inputs (none of them is stored here; only their outputs are):
  T.py  THUDM/chatglm3-6b `tokenization_chatglm.py` (revision 456aa875, as ../shared/reference used): its
        `build_single_message` and `build_chat_input` run unchanged on THUDM's SPTokenizer.
  P.py  THUDM/ChatGLM3 `finetune_chatmodel_demo/preprocess_utils.py` (the parent of commit 9484f82, the last
        version with tool data): `format_conversation` and the loss-mask shift of `MultiTurnDataset`; needs
        `astunparse` on the path.
  glm4.jinja  the `chat_template` of THUDM/glm-4-9b-chat's tokenizer_config.json, rendered with transformers'
        renderer as glm-4-9b-chat's tokenizer does; per message as its fine-tuning script renders them.

Every case also holds the same conversation as an OpenAI-style record, which our code must turn into the same
ids (ChatGLM3: THUDM's real tokenizer; GLM-4: the text, tokenized in the test by the tiny GLM-4 tokenizer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

WEATHER = {"name": "get_weather", "description": "查询某个城市今天的天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"},
                                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city"]}}
RATE = {"name": "exchange_rate", "description": "Currency exchange rate",
        "parameters": {"type": "object", "properties": {"base": {"type": "string"}, "quote": {"type": "string"},
                                                        "amount": {"type": "number"}}}}

# (name, tools, system, turns): a turn is ("user", text) | ("assistant", text) | ("call", name, args, result)
CASES = [
    ("one_call", [WEATHER], None, [
        ("user", "北京今天天气怎么样？"),
        ("call", "get_weather", {"city": "北京"}, {"temperature": 3, "sky": "晴"}),
        ("assistant", "北京今天晴，3 度。")]),
    ("plain_round_then_call", [WEATHER, RATE], None, [
        ("user", "你好"), ("assistant", "你好！有什么可以帮你？"),
        ("user", "100 dollars in yuan, and it's cold?"),
        ("call", "exchange_rate", {"base": "USD", "quote": "CNY", "amount": 100, "note": "it's"}, "718.2"),
        ("assistant", "100 USD is 718.2 CNY.")]),
    ("system_two_calls", [WEATHER, RATE], "你是一个旅行助手。", [
        ("user", "上海和广州哪里更暖和？"),
        ("call", "get_weather", {"city": "上海", "unit": "c"}, "12"),
        ("call", "get_weather", {"city": "广州", "unit": "c"}, "21"),
        ("assistant", "广州更暖和：21 度，上海 12 度。")]),
]


def openai_record(tools, system, turns) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    n = 0
    for t in turns:
        if t[0] == "call":
            n += 1
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{n}", "type": "function",
                 "function": {"name": t[1], "arguments": json.dumps(t[2], ensure_ascii=False)}}]})
            msgs.append({"role": "tool", "tool_call_id": f"call_{n}",
                         "content": t[3] if isinstance(t[3], str) else json.dumps(t[3], ensure_ascii=False)})
        else:
            msgs.append({"role": t[0], "content": t[1]})
    return {"tools": [{"type": "function", "function": f} for f in tools], "messages": msgs}


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chatglm3_cases(args) -> list[dict]:
    code = load(args.chatglm3_tokenizer_code, "thudm_tokenization_chatglm3")
    pre = load(args.chatglm3_preprocess, "thudm_preprocess_utils")
    sp = code.SPTokenizer(args.sp_model)
    # THUDM's methods on THUDM's SPTokenizer; only transformers' batching is stood in for (it adds the prefix).
    tok = types.SimpleNamespace(tokenizer=sp, special_tokens={}, eos_token_id=sp.eos_id, name="GLMTokenizer")
    for m in ("get_command", "build_single_message", "build_chat_input", "get_prefix_tokens"):
        setattr(tok, m, types.MethodType(getattr(code.ChatGLMTokenizer, m), tok))
    tok.batch_encode_plus = lambda batch, **kw: {"input_ids": [tok.get_prefix_tokens() + batch[0]]}
    out = []
    for name, tools, system, turns in CASES:
        convs = [{"role": "system", "content": system}] if system else []
        for t in turns:
            if t[0] == "call":
                convs.append({"role": "tool", "name": t[1], "parameters": t[2], "observation": t[3]})
            else:
                convs.append({"role": t[0], "content": t[1]})
        tokens, masks = pre.format_conversation({"conversations": convs, "tools": tools}, tok, "conversations",
                                                "tools")
        shifted = [False] + masks[:-1]  # MultiTurnDataset: the label of a token comes from the token before it
        labels = [t if m else -100 for t, m in zip(tokens, shifted)]
        # The server's prompt after the last tool result, as build_chat_input builds it for the OpenAI demo.
        history = [{"role": "system", "content": pre.TOOL_DEFINITION_PREFIX.rstrip("\n"), "tools": tools}]
        history += [{"role": "system", "content": system}] if system else []
        last_call = max(i for i, t in enumerate(turns) if t[0] == "call")
        for t in turns[:last_call]:
            if t[0] == "call":
                history.append({"role": "assistant", "metadata": t[1],
                                "content": pre.FUNCTION_CALL_PREFIX + pre.format_function_call("tool_call", t[2])
                                + pre.FUNCTION_CALL_POSTFIX})
                history.append({"role": "observation", "content": t[3] if isinstance(t[3], str)
                                else json.dumps(t[3], ensure_ascii=False)})
            else:
                history.append({"role": t[0], "content": t[1]})
        call = turns[last_call]
        history.append({"role": "assistant", "metadata": call[1],
                        "content": pre.FUNCTION_CALL_PREFIX + pre.format_function_call("tool_call", call[2])
                        + pre.FUNCTION_CALL_POSTFIX})
        result = call[3] if isinstance(call[3], str) else json.dumps(call[3], ensure_ascii=False)
        prompt = tok.build_chat_input(result, history=history, role="observation")["input_ids"][0]
        record = openai_record(tools, system, turns)
        out.append({"name": name, "record": record, "input_ids": tokens, "labels": labels,
                    "prompt_after_last_result": {"record": {**record, "messages": record["messages"][:-1]},
                                                 "input_ids": prompt}})
    return out


def glm4_cases(args) -> list[dict]:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = Path(args.glm4_template).read_text(encoding="utf-8")

    def render(messages, gen=False):
        texts, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                         add_generation_prompt=gen)
        return texts[0]

    out = []
    for name, tools, system, turns in CASES:
        msgs = [{"role": "system", "content": system or "",
                 "tools": [{"type": "function", "function": f} for f in tools]}]
        for t in turns:
            if t[0] == "call":
                msgs.append({"role": "assistant", "metadata": t[1], "content": json.dumps(t[2], ensure_ascii=False)})
                msgs.append({"role": "observation", "content": t[3] if isinstance(t[3], str)
                             else json.dumps(t[3], ensure_ascii=False)})
            else:
                msgs.append({"role": t[0], "content": t[1]})
        # glm-4's fine-tuning script: each message rendered alone without the [gMASK]<sop> prefix, learned unless
        # system/user/observation, then <|endoftext|>; labels shifted by one as for ChatGLM3.
        pieces = [{"text": render([m])[len("[gMASK]<sop>"):], "learned": m["role"] == "assistant"} for m in msgs]
        record = openai_record(tools, system, turns)
        last_obs = max(i for i, m in enumerate(msgs) if m["role"] == "observation")
        out.append({"name": name, "record": record, "text": render(msgs) + "<|endoftext|>", "messages": pieces,
                    "prompt_after_last_result": {"record": {**record, "messages": record["messages"][:-1]},
                                                 "text": render(msgs[:last_obs + 1], gen=True)}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chatglm3_tokenizer_code", required=True)
    ap.add_argument("--chatglm3_preprocess", required=True)
    ap.add_argument("--sp_model", required=True)
    ap.add_argument("--glm4_template", required=True)
    ap.add_argument("--out", default=str(Path(__file__).with_name("tools.json")))
    args = ap.parse_args()
    data = {"source": __doc__.split("\n\n")[2].strip(), "command": " ".join(["python"] + sys.argv[:1] + [
        "--chatglm3_tokenizer_code T.py --chatglm3_preprocess P.py --sp_model tokenizer.model --glm4_template glm4.jinja"]),
        "chatglm3": chatglm3_cases(args), "glm4": glm4_cases(args)}
    Path(args.out).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
