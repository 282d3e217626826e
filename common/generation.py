"""Greedy replies from a loaded model (with or without its adapter), batched: what the training worker's
evals, the merge check and jobs/evaluate.py generate. Serving has its own engine (serving/engine.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from common.data import Conversation, answer_text
from common.templates import get_template
from common.tool_eval import reference_text

REPLACEMENT = "\ufffd"  # what bytes that form no character decode to: never part of a reply


@torch.no_grad()
def generate_replies(model, tok, template_name: str, convs: list[Conversation], device, max_new_tokens: int,
                     batch_size: int = 8, progress: Callable[[int], None] | None = None, raw: bool = False) -> list[str]:
    """One greedy reply per conversation, `batch_size` prompts at a time.

    Prompts are left-padded with an attention mask, which gives the replies of one-at-a-time generation
    (tests/test_generation.py); they are grouped by length so that little of a batch is padding."""
    template = get_template(template_name)
    stop = template.stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = [template.prompt(tok, replace(c, answer=None)) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=pad, use_cache=True)
            for i, row in zip(chunk, out[:, width:].tolist()):
                end = next((k for k, t in enumerate(row) if t in stop), len(row))
                text = tok.decode(row[:end], skip_special_tokens=True)
                # raw: the metadata line kept (a tool call's function name; common/tool_eval.py reads it).
                replies[i] = (text if raw else template.clean_reply(text)).replace(REPLACEMENT, "")
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return replies


def prompt_text(conv: Conversation) -> str:
    """A conversation's prompt as plain text, for tables (earlier turns, then the question)."""
    turns = [f"Q: {q}\nA: {answer_text(a)}" for q, a in conv.history]
    return "\n".join([*turns, f"Q: {conv.query}"])


def generations_table(convs: list[Conversation], replies: list[str], rows: list[dict[str, float]]) -> dict[str, list]:
    """Prompt, reference, reply and the main scores per conversation: the MLflow table of an eval."""
    return {"prompt": [prompt_text(c) for c in convs], "reference": [reference_text(c) for c in convs],
            "reply": replies, **{k: [round(r[k], 2) for r in rows] for k in ("bleu-4_chars", "rouge-l_jieba")}}


def sample_reply(model, tok, template_name: str, conv: Conversation, device, max_new_tokens: int = 48) -> str:
    """One greedy reply (the training log's sample, the merge report's)."""
    return generate_replies(model, tok, template_name, [conv], device, max_new_tokens)[0]
