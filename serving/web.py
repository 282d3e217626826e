"""The Gradio chat page (mounted at /ui): streams through the model deployment, never a second copy."""

from __future__ import annotations

import hmac
import json
import re

from ray.exceptions import RayError

# How the page shows a tool call; read back from the chat history when the conversation goes on.
CALL_SHOWN = "🔧 **{name}**\n```json\n{arguments}\n```\nSend the tool's result as your next message."
_CALL_SHOWN = re.compile(r"^🔧 \*\*(\w+)\*\*\n```json\n(.*)\n```\n", re.S)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def tool_conversation(history: list[tuple[str, str]], message: str, tools_json: str) -> dict:
    """The chat so far as a conversation with tools: a shown call is the assistant's call again, and the message
    that follows it is that call's result. Raises ValueError for tools that are not valid."""
    from common.chat_records import RecordError, messages_conversation
    from common.tools import tool_specs

    try:
        specs = tool_specs(tools_json)
    except ValueError as err:
        raise ValueError(f"Tools: {err}") from None
    messages, waiting = [], False
    for text, role in [*history, (message, "user")]:
        call = _CALL_SHOWN.match(text) if role == "assistant" else None
        if call:
            messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": "call", "type": "function",
                             "function": {"name": call.group(1), "arguments": call.group(2)}}]})
        elif role == "user" and waiting:
            messages.append({"role": "tool", "tool_call_id": "call", "content": text})
        else:
            messages.append({"role": role, "content": text})
        waiting = bool(call)
    try:
        conv = messages_conversation({"tools": specs, "messages": messages}, prompt=True)
    except RecordError as err:
        raise ValueError(f"this chat cannot continue with tools: {err}") from None
    return {**conv.to_dict(), "tool_choice": "auto"}


def build_ui(streams, api_key: str | None, models: list[str] = ()):
    """`models`: the base's name and the configured adapters' (a selector when there are adapters; any other
    name the API takes, runs:/... or models:/..., may be typed into it)."""
    import gradio as gr

    async def respond(message, history, max_length, top_p, temperature, *extra):
        key = extra[0] if api_key is not None else None
        model = extra[-2] if len(models) > 1 else None
        tools_json = extra[-1] or ""
        if api_key is not None and not hmac.compare_digest(str(key or ""), api_key):
            yield "This server needs an API key: enter it in the 'API key' box below the chat."
            return
        turns = [(_text(h["content"]), h["role"]) for h in history]
        pairs, q = [], None
        for text, role in turns:
            if role == "user":
                q = text
            elif role == "assistant" and q is not None:
                pairs.append((q, text))
                q = None
        conv = {"system": None, "history": pairs, "query": _text(message)}
        if tools_json.strip():
            try:
                conv = tool_conversation([(t, r) for t, r in turns], _text(message), tools_json)
            except ValueError as err:
                yield f"({err})"
                return
        sampling = {"max_tokens": int(max_length), "temperature": float(temperature), "top_p": float(top_p),
                    "repetition_penalty": 1.0, "stop": ()}
        reply = ""
        try:
            async for chunk in streams.stream.remote(conv, sampling, None, model or None):
                if "error" in chunk:  # refused, or ended by the server: say so after what came
                    yield (reply + "\n\n" if reply else "") + f"({chunk['message']})"
                    return
                if "delta" in chunk:
                    reply += chunk["delta"]
                    yield reply
                elif "tool_call" in chunk:
                    call = chunk["tool_call"]
                    arguments = json.dumps(json.loads(call["arguments"]), ensure_ascii=False, indent=2)
                    yield CALL_SHOWN.format(name=call["name"], arguments=arguments)
        except RayError as err:
            yield (reply + "\n\n" if reply else "") + f"(the model replica failed: {type(err).__name__}; retry)"

    inputs = [gr.Slider(1, 2048, value=512, step=1, label="Maximum length"),
              gr.Slider(0.01, 1.0, value=0.7, step=0.01, label="Top P"),
              gr.Slider(0.0, 1.5, value=0.95, step=0.01, label="Temperature")]
    if api_key is not None:
        inputs.append(gr.Textbox(label="API key", type="password"))
    if len(models) > 1:
        inputs.append(gr.Dropdown(list(models), value=models[0], allow_custom_value=True, label="Model",
                                  info="the base or an adapter (or runs:/<run_id>, models:/<name>@<alias>)"))
    inputs.append(gr.Textbox(label="Tools (JSON)", lines=3, placeholder='[{"type": "function", "function": '
                             '{"name": "get_weather", "parameters": {...}}}]',
                             info="ChatGLM3 / GLM-4: the model may call these; a call is shown, and your next "
                                  "message is its result"))
    return gr.ChatInterface(respond, additional_inputs=inputs, title="glmops chat",
                            additional_inputs_accordion=gr.Accordion("Settings", open=api_key is not None or
                                                                     len(models) > 1),
                            api_name="respond")
