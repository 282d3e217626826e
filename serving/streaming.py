"""Token streaming for one chat request: generation in a thread, UTF-8-safe text deltas, cancellation.

Byte-level and sentencepiece byte-fallback tokenizers can split one Chinese character over several
tokens; decoding token by token would emit U+FFFD halves. We decode the whole reply so far and hold back
text while it ends in an incomplete character, so every delta is whole characters.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

REPLACEMENT = "\ufffd"


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.95
    top_p: float = 0.7
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    min_tokens: int = 0


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Queue:
    """Token ids from the generation thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_len: int):
        self.loop, self.q, self.prompt_len, self.seen = loop, asyncio.Queue(), prompt_len, 0

    # transformers' streamer interface: put(tensor), end()
    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.seen == 0 and len(ids) == self.prompt_len:  # the prompt itself comes first
            self.seen = 1
            return
        self.seen = 1
        self.loop.call_soon_threadsafe(self.q.put_nowait, ids)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, None)


async def stream_reply(model, tok, prompt_ids: list[int], stop_ids: list[int], sampling: Sampling,
                       clean=lambda s: s) -> AsyncIterator[dict]:
    """Yield {"delta": text} chunks, then {"finish_reason", "completion_tokens"}; cancels on close."""
    loop = asyncio.get_running_loop()
    queue = _Queue(loop, len(prompt_ids))
    cancel = threading.Event()
    device = next(model.parameters()).device
    do_sample = sampling.temperature > 0
    kwargs = dict(input_ids=torch.tensor([prompt_ids], device=device), max_new_tokens=sampling.max_tokens,
                  do_sample=do_sample, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id, streamer=queue,
                  stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]),
                  repetition_penalty=sampling.repetition_penalty, min_new_tokens=sampling.min_tokens,
                  use_cache=True)
    if do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - reported to the caller below
            errors.append(err)
            queue.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ids: list[int] = []
    sent = ""
    finish = "length"
    try:
        while True:
            new = await queue.q.get()
            if new is None:
                break
            for t in new:
                if t in stop_ids:
                    finish = "stop"
                    break
                ids.append(t)
            text = clean(tok.decode(ids, skip_special_tokens=True))
            hit = next((s for s in sampling.stop if s and s in text), None)
            if hit:
                text, finish = text[: text.index(hit)], "stop"
            if text.endswith(REPLACEMENT) and finish != "stop":
                continue  # half a character: wait for the rest of its bytes
            if len(text) > len(sent) and text.startswith(sent):
                yield {"delta": text[len(sent):]}
                sent = text
            if finish == "stop":
                cancel.set()
                break
        if errors:
            raise errors[0]
        yield {"finish_reason": finish, "completion_tokens": len(ids), "prompt_tokens": len(prompt_ids)}
    finally:
        cancel.set()  # the client went away or we are done: stop generating
