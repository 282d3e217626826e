"""The Gradio chat page (mounted at /ui): streams through the model deployment, never a second copy."""

from __future__ import annotations

import hmac

from ray.exceptions import RayError


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def build_ui(streams, api_key: str | None, models: list[str] = ()):
    """`models`: the base's name and the configured adapters' (a selector when there are adapters; any other
    name the API takes, runs:/... or models:/..., may be typed into it)."""
    import gradio as gr

    async def respond(message, history, max_length, top_p, temperature, *extra):
        key = extra[0] if api_key is not None else None
        model = extra[-1] if len(models) > 1 else None
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
    return gr.ChatInterface(respond, additional_inputs=inputs, title="glmops chat",
                            additional_inputs_accordion=gr.Accordion("Settings", open=api_key is not None or
                                                                     len(models) > 1),
                            api_name="respond")
