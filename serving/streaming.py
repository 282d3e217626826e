"""Token ids to text for streaming (UTF-8-safe deltas, stop strings), and the old per-request path.

Byte-level and sentencepiece byte-fallback tokenizers can split one Chinese character over several
tokens; decoding token by token would emit U+FFFD halves. We hold back text while it ends in an
incomplete character, so every delta is whole characters, and drop the U+FFFD that bytes which never form
a character decode to (a model can emit a lone continuation byte, or a lead byte followed by ASCII).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from serving.sampling import SamplingParams

REPLACEMENT = "\ufffd"


Sampling = SamplingParams  # the per-request path takes the same settings


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


class Detokenizer:
    """Token ids → whole-character text deltas, cut at the first stop string.

    Incremental, as vLLM does it: only the tokens since the last complete character (plus the few before
    them, for context) are decoded per token, so a long reply costs linear time, not quadratic. Text is
    final up to a trailing incomplete character (appending bytes changes only that tail), so everything
    before it goes out at once, and a reply that ends in half a character loses only that half."""

    def __init__(self, tok, stop: tuple[str, ...] = (), clean=lambda s: s):
        self.tok, self.stop, self.clean = tok, stop, clean
        self.ids: list[int] = []
        self.prefix = 0   # ids[prefix:read] were decoded already: the context for the next piece
        self.read = 0
        self.held = 0     # characters of the pending piece (ids[read:]) already taken, before its incomplete tail
        self.raw = ""     # everything decoded so far, without U+FFFD
        self.sent = ""    # what has been handed out
        self.stopped = False

    def add(self, *tokens: int) -> str:
        """The new text after `tokens` ("" while it ends in half a character); sets `stopped` on a stop string."""
        self.ids.extend(tokens)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if not now.startswith(before):
            return ""  # the context decodes differently with what follows: wait for more
        piece = now[len(before):]
        final = piece.rstrip(REPLACEMENT)  # a trailing U+FFFD may still become a character
        if len(final) < len(piece):
            self.raw += final[self.held:].replace(REPLACEMENT, "")
            self.held = max(self.held, len(final))
        else:
            self.raw += piece[self.held:].replace(REPLACEMENT, "")  # bytes that form no character: dropped
            self.prefix, self.read, self.held = self.read, len(self.ids), 0
        return self._delta()

    def _delta(self) -> str:
        text = self.clean(self.raw)
        hit = next((s for s in self.stop if s and s in text), None)
        if hit:
            text, self.stopped = text[: text.index(hit)], True
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""


async def stream_reply(model, tok, prompt_ids: list[int], stop_ids: list[int], sampling: Sampling,
                       clean=lambda s: s) -> AsyncIterator[dict]:
    """The per-request path (the benchmark's baseline): its own `generate` thread per request.

    Yields {"delta": text} chunks, then {"finish_reason", "completion_tokens"}; cancels on close."""
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
    if sampling.suppress_first:
        kwargs["begin_suppress_tokens"] = list(sampling.suppress_first)
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
    detok = Detokenizer(tok, sampling.stop, clean)
    n = 0
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
                n += 1
                delta = detok.add(t)
                if delta:
                    yield {"delta": delta}
                if detok.stopped:
                    finish = "stop"
                    break
            if finish == "stop":
                cancel.set()
                break
        if errors:
            raise errors[0]
        yield {"finish_reason": finish, "completion_tokens": n, "prompt_tokens": len(prompt_ids)}
    finally:
        cancel.set()  # the client went away or we are done: stop generating
