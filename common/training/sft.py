"""The supervised fine-tuning objective: summed next-token loss over the supervised positions of a micro-batch.

Every stage's loss is a module with the same surface (the worker's loop is one loop for all of them):
`forward(...)` returns the micro-batch's summed loss; `pop_sums()` the stage's extra statistics summed since the
last call (None for SFT); `train_metrics` / `eval_metrics` turn sums into what is logged. Preference losses
(common/training/preference.py) build on the decoder pass here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from common.templates import IGNORE
from common.training.attention import rows_mask, use_varlen, varlen_available
from common.training.memory import loss_chunk_for
from common.training.packing import Batch


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                              chunk: int = 2048) -> torch.Tensor:
    """Sum of cross-entropies of `head(hidden)` against `targets`, a slice of positions at a time.

    Each slice's logits are recomputed in backward instead of kept: the vocabulary is 65k wide, so fp32
    logits for a whole packed batch would be the largest tensor of the step (8k supervised tokens: 2 GiB,
    twice with their gradient)."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total


class CausalLMLoss(torch.nn.Module):
    """The training objective as a module: summed next-token loss of a micro-batch.

    It runs the decoder, keeps only supervised positions, and applies the vocabulary projection slice
    by slice. Being a module lets DDP wrap it (DDP only syncs gradients for work done through its own
    forward)."""

    num_stats = 0     # statistics besides the loss that pop_sums returns

    def __init__(self, model, autocast_dtype: torch.dtype | None, *, varlen: bool = True,
                 loss_chunk: int | None = None, build_masks: bool = False):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        # positions per slice of the loss (memory.loss_chunk_for the model's vocabulary when None); 0: the whole
        # batch's logits at once (the benchmark's lever)
        self.loss_chunk = loss_chunk_for(model.config) if loss_chunk is None else loss_chunk
        # varlen=False: packed rows use SDPA with a block-diagonal mask (the benchmark's lever)
        self.varlen = varlen and varlen_available(next(model.parameters()).device, autocast_dtype)
        # build_masks=True: transformers still builds its packed-row mask (unused on the varlen path; the
        # benchmark's lever)
        self.build_masks = build_masks
        if self.varlen:
            use_varlen(model)

    def supervised_hidden(self, input_ids, targets, position_ids=None, attention_mask=None, cu_seqlens=None,
                          max_seqlen: int = 0, supervised: torch.Tensor | None = None,
                          prefix_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states at the supervised positions, and their targets (call under autocast).

        `supervised`: flat indices of the positions whose targets count (Batch.supervised); without them they
        are found with a boolean mask, which waits for the GPU mid-step. `prefix_lens`: packed ChatGLM-6B rows,
        whose model builds its own prefix masks from them and the boundaries."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        else:
            kwargs["position_ids"] = position_ids
        if prefix_lens is not None:
            kwargs.update(cu_seq_lens_q=cu_seqlens, prefix_lens=prefix_lens)
        elif self.varlen and cu_seqlens is not None and attention_mask is None:
            # How many examples a micro-batch holds changes as soon as a step packs into more than one row. Left
            # to PyTorch's automatic dynamic shapes, that first change recompiles every graph of the layers
            # mid-run (~15 s each on an H100, whenever a batch first splits: bench/NOTES.md, "preference
            # round 2"); marked dynamic from the first compile, it never does.
            torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
            kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                          max_length_k=max_seqlen)
            if not self.build_masks:
                kwargs["attention_mask"] = rows_mask(input_ids.device)
        hidden = base.get_decoder()(**kwargs).last_hidden_state
        if supervised is not None:
            return hidden.flatten(0, 1).index_select(0, supervised), targets.flatten().index_select(0, supervised)
        keep = targets != IGNORE
        return hidden[keep], targets[keep]

    def head(self) -> torch.nn.Module:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_output_embeddings()

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, cu_seqlens=None,
                max_seqlen: int = 0, supervised: torch.Tensor | None = None,
                prefix_lens: torch.Tensor | None = None, sequence_of: torch.Tensor | None = None,
                num_sequences: int = 0, examples=None) -> torch.Tensor:
        with self.autocast(input_ids.device):
            hidden, targets = self.supervised_hidden(input_ids, targets, position_ids, attention_mask, cu_seqlens,
                                                     max_seqlen, supervised, prefix_lens)
            if self.loss_chunk <= 0:
                return _chunk_loss(self.head(), hidden, targets)
            return chunked_cross_entropy_sum(self.head(), hidden, targets, self.loss_chunk)

    # -- what the stage logs besides the loss ---------------------------------------------------------------
    def units_of(self, batch: Batch) -> int:
        """What a step's loss is averaged over, in `batch`: its supervised tokens."""
        return batch.num_targets

    def describe(self) -> str:
        """The start-up line's words on the objective ("" when there is nothing to add)."""
        return ""

    def end_epoch(self) -> str:
        """Called by every worker together at each epoch's end (what a loss keeps between epochs); what to log."""
        return ""

    def progress(self, sums: torch.Tensor | None, units: float) -> str:
        """What a progress line shows besides the loss."""
        return ""

    def pop_sums(self) -> torch.Tensor | None:
        return None

    def train_metrics(self, sums: torch.Tensor | None, units: float) -> dict[str, float]:
        return {}

    def eval_metrics(self, loss_sum: float, units: float, sums: torch.Tensor | None) -> dict[str, float]:
        eval_loss = loss_sum / max(units, 1)
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))}


def batch_loss_sum(loss_fn: CausalLMLoss | torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of the stage's losses over one micro-batch (next-token losses of its supervised positions for SFT)."""
    return loss_fn(batch.input_ids, batch.targets, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                   supervised=batch.supervised, prefix_lens=batch.prefix_lens, sequence_of=batch.sequence_of,
                   num_sequences=batch.num_sequences, examples=batch.examples)
