"""torch.compile of the decoder layers for training.

A training step of the 4-bit model launched ~9,000 kernels (bench/NOTES.md, the profile): RMSNorm as six
fp32 pieces, rotary as slices, stacks and concatenations, LoRA's dropout, scale and add, SwiGLU, and the
dtype casts around each, every one a kernel of its own with its own trip through memory, and the GPU idle
whenever they take less time than their launch. Compiling a decoder layer fuses those into a few Triton
kernels and leaves the GEMMs (bitsandbytes' dequantisation and cuBLAS, which it registers as custom ops)
and varlen attention as they are.

Where memory is short, LoRA's dropout is drawn again in backward instead of kept (`recompute_lora_dropout`;
the worker decides with `memory.keep_dropout_where_it_fits`): inductor never recomputes a random op on its
own, so each LoRA module keeps its dropped input (bf16) and the mask (bool), 3 bytes per element of its
input and token: with LoRA on q/k/v, 29 % of a compiled layer's activations, with the job's LoRA on all six
linears 54 % (bench/NOTES.md, "Round 3"). Drawing it again costs time (1.08x with the job's LoRA, "Round 4"),
so a card with room keeps it.

All layers run the same code, so one compiled graph serves all of them: dynamo treats a layer's weights
as inputs. Row lengths change with every micro-batch, so the graph is compiled for any length at once
(dynamic shapes) instead of again for each new length. Replies generated during evaluation run eager:
they go through the KV cache a token at a time, which would compile a graph per layer for little gain.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.training.memory import decoder_layers


class RecomputedDropout(torch.nn.Dropout):
    """`nn.Dropout` whose mask is drawn again in backward (from the same random state) instead of kept.

    Inside a compiled layer the checkpoint marks the dropout for recomputation; the partitioner then replays
    it with the random state it saved, and recomputes its input from the layer's (cheap pointwise work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return checkpoint(_dropout_for_matmul, x, self.p, use_reentrant=False)


def _dropout_for_matmul(x: torch.Tensor, p: float) -> torch.Tensor:
    # Cast to the autocast dtype here, where it is recomputed too: cast outside, LoRA A's matmul would keep
    # the cast copy of the dropped input for its weight gradient.
    out = F.dropout(x, p, True)
    if torch.is_autocast_enabled(x.device.type):
        out = out.to(torch.get_autocast_dtype(x.device.type))
    return out


def recompute_lora_dropout(model) -> int:
    """Swap every LoRA dropout of `model` for `RecomputedDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = RecomputedDropout(dropout.p)
                swapped += 1
    return swapped


def wants_compile(setting: str, device: torch.device) -> bool:
    """`torch_compile`: auto compiles on a CUDA GPU; true compiles wherever the layers are found; false never."""
    if setting == "false":
        return False
    if setting == "true":
        return True
    return device.type == "cuda"


def compile_layers(model, backend="inductor", dynamic: bool | None = None, fallback: bool = False) -> int:
    """Compile every decoder layer of `model` (a transformers model, or peft around one) in place; returns
    how many were compiled (0 where the model has no layer list). `dynamic=None`: PyTorch's automatic
    choice (compiled for the first shapes, again with the dimensions that changed made dynamic).

    `fallback`: a layer that fails to compile (a machine without a C compiler for Triton's launcher, a GPU
    Triton does not support) runs eager, with PyTorch's warning, instead of stopping the run; `auto` asks for
    it, `true` does not. It is a setting of the whole process (dynamo's `suppress_errors`)."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    torch._dynamo.config.suppress_errors = fallback
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic)
    return len(layers)


def eager():
    """A context in which compiled layers run their plain Python code (generation, token by token)."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
