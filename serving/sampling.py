"""Next-token choice for a whole batch on the device: greedy, temperature, top-p, repetition penalty.

Each row carries its own settings. A row with a `seed` draws its noise from its own generator, so its
reply is the same whatever else shares the batch; rows without one share the engine's generator.
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p and
needs one kernel for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.runners import to_device


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.95
    top_p: float = 0.7
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    seed: int | None = None
    suppress_first: tuple[int, ...] = ()  # token ids the first generated token may not be (tool_choice required)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Row:
    """What the sampler needs of one sequence this step."""

    params: SamplingParams
    generator: torch.Generator | None
    slot: int                # the sequence's row in the engine's seen-token table
    suppress: list[int]      # token ids not allowed now (stop ids while under min_tokens)


class Sampler:
    def __init__(self, vocab_size: int, num_slots: int, device: torch.device, seed: int = 0,
                 last_token: torch.Tensor | None = None):
        """`last_token` [num_slots]: where each slot's newest token is also written (the runner's decode input)."""
        self.device = device
        self.last_token = last_token
        # Which tokens each slot has seen (prompt + reply): the repetition penalty's domain, as in HF.
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # `seen[i, j] = True` would copy the Python True to the device from pageable memory, which waits for
        # every queued kernel; a device-side constant keeps the step asynchronous.
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def start(self, slot: int, prompt: list[int]) -> None:
        self.seen[slot].zero_()
        self.seen[slot].index_put_((to_device(prompt, self.device),), self._true)

    def __call__(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Token ids [n] for logits [n, vocab] (float32), left on the device: nothing here waits for the GPU."""
        n = len(rows)
        slots = to_device([r.slot for r in rows], self.device)
        penalties = [r.params.repetition_penalty for r in rows]
        if any(p != 1.0 for p in penalties):
            pen = to_device(penalties, self.device, torch.float32)[:, None]
            seen = self.seen[slots]
            scaled = torch.where(logits < 0, logits * pen, logits / pen)
            logits = torch.where(seen, scaled, logits)
        banned = [(i, t) for i, r in enumerate(rows) for t in r.suppress]
        if banned:
            idx = to_device(banned, self.device)
            logits = logits.index_put((idx[:, 0], idx[:, 1]), torch.full((), float("-inf"), device=self.device))
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            settings = to_device([[max(r.params.temperature, 1e-5) for r in rows], [r.params.top_p for r in rows],
                                  greedy], self.device, torch.float32)
            probs = torch.softmax(logits / settings[0][:, None], dim=-1)
            if any(r.params.top_p < 1 for r in rows):
                probs = self._top_p(probs, settings[1])
            noise = torch.empty_like(probs)
            shared = [i for i, r in enumerate(rows) if r.generator is None]
            if len(shared) == n:
                noise.exponential_(generator=self.generator)
            else:
                if shared:
                    noise[to_device(shared, self.device)] = torch.empty(
                        len(shared), probs.shape[1], device=self.device).exponential_(generator=self.generator)
                for i, r in enumerate(rows):
                    if r.generator is not None:
                        noise[i].exponential_(generator=r.generator)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(settings[2] > 0, logits.argmax(dim=-1), sampled)
        self.seen.index_put_((slots, tokens), self._true)
        if self.last_token is not None:
            self.last_token.index_copy_(0, slots, tokens)
        return tokens

    @staticmethod
    def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p[:, None]
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return probs * keep
