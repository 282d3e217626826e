"""Preference tuning (`--stage dpo`): DPO's sigmoid loss, IPO, SimPO and ORPO over chosen/rejected pairs.

A micro-batch holds whole pairs, each as two sequences back to back (chosen, then rejected: common/training/
epochs.py keeps them together), packed padding-free like SFT rows. One forward gives every sequence's summed
log-probability of its supervised tokens (the answer); the losses compare them per pair.

The reference policy costs no second model: with LoRA it is the same base with the adapter switched off
(`disable_adapter()`), run without gradients in the same step; a run that starts from an SFT adapter
(`--init_adapter`) keeps a frozen copy of it as the reference instead. SimPO and ORPO need no reference at all.

The reference never changes during a run, so each training pair's reference log-probabilities are computed once,
in the step that first sees the pair, and kept by example (`ReferenceCache`): from the second epoch on, a
micro-batch whose pairs are all known skips the reference pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.training.sft import CausalLMLoss

LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_ADAPTER = "reference"  # the frozen starting adapter of an --init_adapter run
NEEDS_REFERENCE = {"sigmoid", "ipo"}
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}

# per-pair statistics, summed over the pairs of a step (or of the eval split); logged as their means
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")
EVAL_NAMES = {"rewards/chosen": "eval_rewards_chosen", "rewards/rejected": "eval_rewards_rejected",
              "rewards/accuracies": "eval_rewards_accuracy", "rewards/margins": "eval_rewards_margins",
              "logps/chosen": "eval_logps_chosen", "logps/rejected": "eval_logps_rejected"}


@dataclass(frozen=True)
class PreferenceSettings:
    loss: str = "sigmoid"
    beta: float = 0.1        # sigmoid, IPO, SimPO: the scale of the implicit reward
    simpo_margin: float = 1.0  # SimPO's target margin gamma (in reward units)
    orpo_weight: float = 0.1   # ORPO's lambda: the odds-ratio term beside the chosen answer's NLL

    @property
    def needs_reference(self) -> bool:
        return self.loss in NEEDS_REFERENCE


def _log_one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable near 0 (where e^x -> 1)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(s: PreferenceSettings, chosen: torch.Tensor, rejected: torch.Tensor,
                ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor):
    """(loss, chosen reward, rejected reward) per pair, from summed log-probabilities of each answer.

    sigmoid (DPO):  -log sigma(beta * [(pc - rc) - (pr - rr)]);             rewards beta * (p - r)
    ipo:            ([(pc - rc) - (pr - rr)] - 1 / (2 beta))^2 (sums, as in the IPO paper); rewards as DPO's
    simpo:          -log sigma(beta * pc / |c| - beta * pr / |r| - gamma);    rewards beta * p / |answer|
    orpo:           -pc / |c| - lambda * log sigma(log odds(c) - log odds(r)), odds(a) = e^m / (1 - e^m) with
                    m = p / |a| (the mean log-probability per token);        rewards m (the mean log-probability)
    """
    if s.loss in NEEDS_REFERENCE:
        c, r = chosen - ref_chosen, rejected - ref_rejected
        if s.loss == "sigmoid":
            loss = -F.logsigmoid(s.beta * (c - r))
        else:
            loss = (c - r - 1 / (2 * s.beta)) ** 2
        return loss, s.beta * c, s.beta * r
    mean_c, mean_r = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    if s.loss == "simpo":
        c, r = s.beta * mean_c, s.beta * mean_r
        return -F.logsigmoid(c - r - s.simpo_margin), c, r
    if s.loss == "orpo":
        log_odds = (mean_c - _log_one_minus_exp(mean_c)) - (mean_r - _log_one_minus_exp(mean_r))
        return -mean_c - s.orpo_weight * F.logsigmoid(log_odds), mean_c, mean_r
    raise ValueError(f"unknown preference loss {s.loss!r}; one of {', '.join(LOSSES)}")


@contextmanager
def reference_policy(model):
    """The model as the reference policy inside the block."""
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    # set_adapter makes the active adapter trainable unless inference_mode: the frozen copy stays frozen, and
    # switching back makes the trained adapter trainable again (and only it)
    model.base_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        model.base_model.set_adapter(active)


class ReferenceCache:
    """The reference log-probabilities (chosen, rejected) of each training pair, by its example index.

    A step adds what it computed without reading it back (the values stay on the device: no step waits for the
    GPU); at an epoch's end they come to the host and every worker's are shared (each worker saw different
    pairs). A resumed run starts empty and fills again as it goes."""

    def __init__(self):
        self.known: dict[int, tuple[float, float]] = {}
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.known)

    def lookup(self, examples: np.ndarray, device: torch.device) -> torch.Tensor | None:
        """The pairs' values as chosen, rejected, chosen, ... (float32 on `device`), or None if any is unknown."""
        try:
            values = [v for i in examples.tolist() for v in self.known[i]]
        except KeyError:
            return None
        host = torch.tensor(values, dtype=torch.float32)
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host

    def add(self, examples: np.ndarray, ref: torch.Tensor) -> None:
        self._pending.append((np.asarray(examples), ref.detach()))

    def end_epoch(self) -> None:
        """Keep what this epoch computed, every worker's (a collective: all workers call it together)."""
        new: dict[int, tuple[float, float]] = {}
        for examples, ref in self._pending:
            new.update(zip(examples.tolist(), map(tuple, ref.float().cpu().view(-1, 2).tolist())))
        self._pending = []
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, new)
            for part in every:
                self.known.update(part)
        else:
            self.known.update(new)


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) at each position, the vocabulary projected a slice at a time (logits recomputed in backward,
    as for the SFT loss)."""
    from torch.utils.checkpoint import checkpoint

    if chunk <= 0:
        return _token_logps(head, hidden, targets)
    parts = []
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class PreferenceLoss(CausalLMLoss):
    """Summed preference loss of the pairs in a micro-batch; its per-pair statistics are summed in `pop_sums`."""

    num_stats = len(STATS)

    def __init__(self, model, autocast_dtype: torch.dtype | None, settings: PreferenceSettings, **kw):
        super().__init__(model, autocast_dtype, **kw)
        self.settings = settings
        self._sums: torch.Tensor | None = None
        self.reference_cache = ReferenceCache()

    def sequence_logps(self, input_ids, targets, sequence_of: torch.Tensor, num_sequences: int,
                       **batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's summed log-probability of its supervised tokens, and how many there are."""
        with self.autocast(input_ids.device):
            hidden, targets = self.supervised_hidden(input_ids, targets, **batch)
            logps = token_logps(self.head(), hidden, targets, self.loss_chunk)
        sums = logps.new_zeros(num_sequences).index_add(0, sequence_of, logps)
        counts = logps.new_zeros(num_sequences).index_add(0, sequence_of, torch.ones_like(logps))
        return sums, counts

    def reference_logps(self, input_ids, targets, sequence_of, num_sequences, **batch) -> torch.Tensor:
        """The reference policy's (no gradients): the adapter the run started from, else the base with the adapter
        off."""
        with torch.no_grad(), reference_policy(self.model):
            return self.sequence_logps(input_ids, targets, sequence_of, num_sequences, **batch)[0]

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, cu_seqlens=None,
                max_seqlen: int = 0, supervised: torch.Tensor | None = None,
                prefix_lens: torch.Tensor | None = None, sequence_of: torch.Tensor | None = None,
                num_sequences: int = 0, examples: np.ndarray | None = None) -> torch.Tensor:
        if sequence_of is None or num_sequences % 2:
            raise ValueError("a preference micro-batch holds whole pairs (chosen, rejected, chosen, ...)")
        batch = dict(position_ids=position_ids, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, supervised=supervised, prefix_lens=prefix_lens)
        ref = None
        if self.settings.needs_reference:
            cache = self.reference_cache if self.training and examples is not None else None
            ref = cache.lookup(examples, input_ids.device) if cache is not None else None
            if ref is None:
                ref = self.reference_logps(input_ids, targets, sequence_of, num_sequences, **batch)
                if cache is not None:
                    cache.add(examples, ref)
        logps, counts = self.sequence_logps(input_ids, targets, sequence_of, num_sequences, **batch)
        loss, chosen_reward, rejected_reward = pair_losses(
            self.settings, logps[0::2], logps[1::2], None if ref is None else ref[0::2],
            None if ref is None else ref[1::2], counts[0::2], counts[1::2])
        with torch.no_grad():
            stats = torch.stack([chosen_reward.sum(), rejected_reward.sum(),
                                 (chosen_reward > rejected_reward).float().sum(),
                                 (chosen_reward - rejected_reward).sum(), logps[0::2].sum(), logps[1::2].sum()])
            stats = stats.double()
            self._sums = stats if self._sums is None else self._sums + stats
        return loss.sum()

    def units_of(self, batch) -> int:
        return batch.num_sequences // 2  # pairs

    def end_epoch(self) -> str:
        if not self.settings.needs_reference:
            return ""
        before = len(self.reference_cache)
        self.reference_cache.end_epoch()
        added = len(self.reference_cache) - before
        return (f"reference log-probabilities kept for {added:,} more pairs ({len(self.reference_cache):,} in all): "
                "their reference pass is skipped from now on") if added else ""

    def describe(self) -> str:
        s = self.settings
        reference = ("none needed" if not s.needs_reference else "the adapter the run started from (frozen)"
                     if REFERENCE_ADAPTER in getattr(self.model, "peft_config", {}) else
                     "the base model with the adapter off")
        return f"preference loss: {s.loss} (beta {s.beta:g}); reference policy: {reference}"

    def progress(self, sums: torch.Tensor | None, units: float) -> str:
        m = self.train_metrics(sums, units)
        return f" | reward accuracy {m['rewards/accuracies']:.2f} | margin {m['rewards/margins']:.3f}" if m else ""

    def pop_sums(self) -> torch.Tensor | None:
        sums, self._sums = self._sums, None
        return sums

    def train_metrics(self, sums: torch.Tensor | None, units: float) -> dict[str, float]:
        if sums is None:
            return {}
        return {name: float(v) / max(units, 1) for name, v in zip(STATS, sums.tolist())}

    def eval_metrics(self, loss_sum: float, units: float, sums: torch.Tensor | None) -> dict[str, float]:
        out = {"eval_loss": loss_sum / max(units, 1)}
        out.update({EVAL_NAMES[k]: v for k, v in self.train_metrics(sums, units).items()})
        return out
