"""Tool calls in each family's own words, both ways: what the templates render and what the server and the
evaluation parse, so training and serving can never disagree.

A conversation with tools (common/data.py) holds the tool list (function specs: name, description,
parameters) and, in a round's answer, steps: `{"call": {"name", "arguments"}}`, `{"observation": text}`,
`{"reply": text}`. Each family writes them as its own fine-tuning code and chat template do:

  chatglm3  THUDM's ChatGLM3 (`finetune_chatmodel_demo`, tokenizer `build_chat_input`): a system message
            "Answer the following questions ... tools:\\n" + the list as indented JSON; a call is an assistant
            message whose metadata line is the function name and whose text is a python block calling
            `tool_call(key=value, ...)` (values as Python literals); results come back as `<|observation|>`.
  glm4      glm-4-9b-chat's chat template: a system message naming each function under "## name" with its
            spec as indented JSON; a call is `<|assistant|>name\\n{json arguments}`; results as `<|observation|>`.

Parsing never evaluates code: ChatGLM3's call is read with `ast` and literal values only.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import tokenize
from dataclasses import dataclass
from typing import Any


class BadToolCall(ValueError):
    """A reply that starts like a call (a function name on its first line) but whose arguments do not parse."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def step(self) -> dict:
        return {"call": {"name": self.name, "arguments": self.arguments}}

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def tool_specs(tools: Any, where: str = "tools") -> list[dict]:
    """The function specs of an OpenAI `tools` list (`{"type": "function", "function": {...}}`) or of a plain
    list of specs (sharegpt; also as a JSON string). Raises ValueError naming the entry that is wrong."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: a JSON string that does not parse ({err.msg})") from None
    if not isinstance(tools, list):
        raise ValueError(f"{where}: expected a list of tools, found {type(tools).__name__}")
    specs = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{at}: expected an object, found {type(tool).__name__}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise ValueError(f"{at}.type: only \"function\" tools exist here, found {tool.get('type')!r}")
            tool, at = tool.get("function"), f"{at}.function"
            if not isinstance(tool, dict):
                raise ValueError(f"{at}: expected an object with name, description, parameters")
        name = tool.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{at}.name: expected a function name (letters, digits, _), found {name!r}")
        if "parameters" in tool and not isinstance(tool["parameters"], dict):
            raise ValueError(f"{at}.parameters: expected a JSON schema object, found {type(tool['parameters']).__name__}")
        specs.append(tool)
    return specs


def call_arguments(arguments: Any, where: str) -> dict:
    """A call's arguments: a JSON object, or a string holding one (OpenAI sends a string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: expected a JSON object of arguments, found {type(arguments).__name__}")
    return arguments


class ToolFormat:
    """How one family writes the tool list, a call and a result."""

    def tools_system(self, tools: list[dict]) -> str:
        """The text of the system message that lists the tools."""
        raise NotImplementedError

    def call_message(self, call: ToolCall) -> tuple[str, str]:
        """(metadata line, text) of the assistant message that makes the call."""
        raise NotImplementedError

    def parse_arguments(self, text: str) -> dict:
        raise NotImplementedError

    def parse(self, reply: str) -> ToolCall | None:
        """The call in a reply as generated after `<|assistant|>` (its metadata line first), None for a plain
        reply (empty metadata line). Raises BadToolCall when a call's arguments do not parse."""
        if not reply or reply.startswith("\n"):
            return None
        name, _, text = reply.partition("\n")
        name = name.strip()
        if not name.isidentifier():
            raise BadToolCall(f"{name[:40]!r} is not a function name")
        try:
            return ToolCall(name, self.parse_arguments(text.strip()))
        except (ValueError, SyntaxError) as err:
            raise BadToolCall(f"the arguments of {name} do not parse: {err}") from None


_RENAMED = "_glmops_kw_"


def _rename_keyword_arguments(code: str) -> str:
    """`tool_call(from='USD')` with each keyword-named argument renamed so that Python can parse it. Found
    with Python's own tokenizer, so text inside a string value (`note='a, from=b'`) is never touched."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    except (tokenize.TokenError, SyntaxError) as err:
        raise ValueError(f"not a python call: {err}") from None
    starts = [0]  # where each of the tokenizer's lines begins (it splits at "\n" only, as readline does)
    for line in io.StringIO(code).readlines():
        starts.append(starts[-1] + len(line))
    out = code
    for before, name, after in reversed(list(zip(tokens, tokens[1:], tokens[2:]))):
        if (name.type == tokenize.NAME and keyword.iskeyword(name.string) and before.string in ("(", ",")
                and after.string == "="):
            at = starts[name.start[0] - 1] + name.start[1]
            out = out[:at] + _RENAMED + out[at:]
    return out


class ChatGLM3Tools(ToolFormat):
    PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"

    def tools_system(self, tools):
        return self.PREFIX + json.dumps(tools, indent=4, ensure_ascii=False)

    def call_message(self, call):
        # The keyword values as Python literals, as THUDM's data builder unparses them (repr).
        args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
        return call.name, f"```python\ntool_call({args})\n```"

    def parse_arguments(self, text):
        lines = text.strip().split("\n")
        if lines and lines[0].startswith("```"):
            lines = lines[1:]
        if lines and lines[-1].strip() == "```":
            lines = lines[:-1]
        # A parameter named like a Python keyword (`from`, `class`) is written as it is (THUDM's builder does
        # the same), which Python cannot parse: such names are renamed for the parse and named back after it.
        code = _rename_keyword_arguments("\n".join(lines).strip())
        node = ast.parse(code, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError("expected tool_call(name=value, ...)")
        out = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError("**kwargs in a call")
            out[kw.arg.removeprefix(_RENAMED)] = ast.literal_eval(kw.value)
        return out


class GLM4Tools(ToolFormat):
    INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
             "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
    AFTER_SPEC = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

    def tools_system(self, tools):
        parts = [self.INTRO]
        for spec in tools:
            # One newline before "##": transformers renders the template with trim_blocks, which eats the first
            # of the two that follow the `{% if %}` tag (glm-4-9b-chat's tokenizer renders it that way).
            parts.append(f"\n## {spec['name']}\n\n{json.dumps(spec, ensure_ascii=False, indent=4)}{self.AFTER_SPEC}")
        return "".join(parts)

    def call_message(self, call):
        return call.name, call.arguments_json()

    def parse_arguments(self, text):
        args = json.loads(text) if text else {}
        if not isinstance(args, dict):
            raise ValueError("expected a JSON object")
        return args


FORMATS: dict[str, ToolFormat] = {"chatglm3": ChatGLM3Tools(), "glm4": GLM4Tools()}


def tool_format(template: str) -> ToolFormat | None:
    """The tool format of a chat template, None where the family has none."""
    return FORMATS.get(template)
