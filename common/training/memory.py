"""Gradient checkpointing only where memory needs it.

Recomputing a layer's activations costs about a third of its training time, so checkpointing every
layer (the seed's default) is paid even on cards with room to spare. `gradient_checkpointing: auto`
estimates the activation memory of one micro-batch and checkpoints the fewest layers that make it
fit the card (or `gpu_memory_gib`); `true` checkpoints all layers, `false` none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

# Activation bytes one token keeps per eager decoder layer for backward, without checkpointing, in units of
# (hidden + intermediate) size: measured on an H200 with a 4-bit ChatGLM2-6B and the job's LoRA (bench/NOTES.md).
ACTIVATION_BYTES_PER_UNIT = 12.0
HEADROOM = 0.90  # share of the budget the plan may fill (allocator fragmentation, optimizer, eval)


def expandable_segments() -> bool:
    """Let the CUDA allocator grow segments in place instead of caching fixed blocks, unless the user set
    PYTORCH_CUDA_ALLOC_CONF. Within a tight `gpu_memory_gib`, fixed blocks left 1.9 GiB reserved but unusable
    and ChatGLM-6B ran out of memory at 16 GiB; with growable segments the same plan peaked at 14.5 GiB
    (bench/results/train_chatglm1.json). Returns whether the setting is on."""
    import os

    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or not torch.cuda.is_available():
        return "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # an allocator without the setting: keep its default
        return False
    return True


@dataclass(frozen=True)
class LayerActivations:
    """What decides a decoder layer's activation memory besides its shape: the LoRA modules (each keeps its
    input, and with dropout the dropped copy and its mask, unless the dropout is drawn again in backward) and
    whether the layer runs compiled (inductor keeps far fewer intermediates than eager PyTorch). The default
    is the eager estimate, on the safe side."""

    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.1
    compiled: bool = False
    dropout_recomputed: bool = False

    def bytes_per_token(self, config) -> float:
        """Bytes one token keeps in one layer for backward. Compiled: the tensors the layer's compiled graph
        saves (counted with saved-tensor hooks on the real layer shape, bench/activation_memory.py) plus
        4 x hidden bytes more that the H200 runs kept; with the dropout kept this reproduces the measured 8.0
        (LoRA on q/k/v) and 11.7 (the job's LoRA on all six linears) bytes per unit to within 1 %. With the
        dropout recomputed, LoRA's inputs are recomputed from the layer's too and LoRA keeps only its own
        narrow products (r wide)."""
        _, hidden, inter = model_dims(config)
        if not self.compiled:
            return ACTIVATION_BYTES_PER_UNIT * (hidden + inter)
        kept = 2 * (hidden  # the layer's input, for the first RMSNorm
                    + hidden + 2 * kv_width(config)  # q, k and v after rotary, for flash attention
                    + hidden  # attention's output
                    + hidden  # the second RMSNorm's input
                    + 2 * inter)  # the gate and up projections, for SwiGLU
        if getattr(config, "model_type", None) == "glm4":  # GLM-4-0414's norms of the attention's and MLP's outputs
            kept += 2 * 2 * hidden
        kept += 4 * _heads(config) + 4 * hidden  # attention's fp32 log-sum-exp; what the GPU runs kept beyond the graph
        if self.dropout_recomputed and self.lora_dropout > 0:
            return kept
        per_input = 3 if self.lora_dropout > 0 else 2  # the dropped bf16 input and its bool mask, or the input
        return kept + sum(per_input * width for width in lora_input_widths(config, self.lora_targets))


# The input width of each linear layer LoRA can train in the native GLM layout (peft's "all-linear": all six),
# and in ChatGLM-6B's.
def _native_inputs(config) -> dict[str, int]:
    _, hidden, inter = model_dims(config)
    if getattr(config, "model_type", None) == "chatglm1":
        return {"query_key_value": hidden, "dense": hidden, "dense_h_to_4h": hidden, "dense_4h_to_h": inter}
    return {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden, "gate_up_proj": hidden,
            "down_proj": inter}


def lora_input_widths(config, targets: tuple[str, ...] | str) -> list[int]:
    """One input width per LoRA module of a layer (a name not of the native layout counts as hidden wide)."""
    widths = _native_inputs(config)
    if isinstance(targets, str):
        return list(widths.values())
    _, hidden, _ = model_dims(config)
    return [widths.get(name, hidden) for name in targets]


def kv_width(config) -> int:
    """Width of the keys (= values) of one token: grouped heads x head size, in the native or THUDM layout."""
    _, hidden, _ = model_dims(config)
    heads = _heads(config)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) or hidden // heads
    groups = (getattr(config, "num_key_value_heads", None) or getattr(config, "multi_query_group_num", None)
              or heads)
    return groups * head_dim


def _heads(config) -> int:
    return getattr(config, "num_attention_heads", None) or 32


def model_dims(config) -> tuple[int, int, int]:
    """(layers, hidden, intermediate) for native configs and THUDM's ChatGLM-6B / ChatGLM2-3 ones."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    hidden = config.hidden_size
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "inner_hidden_size", None)
             or getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    return layers, hidden, inter


def vocab_size(config) -> int:
    """THUDM's ChatGLM2/3 configs name it padded_vocab_size (and have no vocab_size)."""
    return getattr(config, "padded_vocab_size", None) or config.vocab_size


def model_shape(folder) -> SimpleNamespace:
    """A model folder's config.json as attributes, read before any model loads (any family's layout)."""
    return SimpleNamespace(**json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))


def activation_bytes(config, tokens: int, checkpointed: int, layer: LayerActivations = LayerActivations()) -> float:
    """Estimated activation memory of one micro-batch of `tokens` with `checkpointed` layers recomputed."""
    layers, hidden, inter = model_dims(config)
    full = tokens * layer.bytes_per_token(config)
    kept = tokens * hidden * 2  # a checkpointed layer keeps only its bf16 input
    recompute = full if checkpointed else 0  # one layer's activations exist again while it is recomputed
    return (layers - checkpointed) * full + checkpointed * kept + recompute


def weight_bytes(config, bits: int) -> float:
    """A generous estimate of the frozen model's GPU bytes before any activation: the decoder's linear layers
    at `bits` (4-bit: half a byte per weight plus block scales), embeddings and the output layer in bf16."""
    layers, hidden, inter = model_dims(config)
    linear = layers * (4 * hidden * hidden + 3 * hidden * inter)  # attention as if without grouped KV heads
    return linear * {4: 0.55, 8: 1.05}.get(bits, 2.0) + 2 * vocab_size(config) * hidden * 2


def free_for_activations(config, budget: float, bits: int, loss_chunk: int) -> float:
    """What a card of `budget` bytes leaves for activations, estimated before the model is loaded (as the
    job's driver must)."""
    return HEADROOM * budget - weight_bytes(config, bits) - loss_bytes(config, loss_chunk)


# The cost model that picks the row length on a tight card, fitted to the H200 runs of bench/NOTES.md (round 4):
# recomputing every layer's forward adds 60 % to a token's compute (19 of 28 layers: 0.536 s per step against
# 0.406 s with none), and a micro-batch costs as much as ~1,400 tokens whatever its size (launches, loss, host).
RECOMPUTE_COST = 0.6
MICRO_BATCH_COST_TOKENS = 1400


def step_cost_per_token(tokens: int, checkpointed: int, layers: int) -> float:
    """Relative time per token of micro-batches of `tokens` with `checkpointed` of `layers` layers recomputed."""
    return 1 + RECOMPUTE_COST * checkpointed / layers + MICRO_BATCH_COST_TOKENS / tokens


def large_data_batching(config, bits: int, budget: float | None, loss_chunk: int,
                        layer: LayerActivations = LayerActivations()) -> tuple[int, int]:
    """(tokens per micro-batch, micro-batches per step) for large data on a worker with `budget` GPU bytes
    (None: unknown, or training on CPU), always the same tokens per step:
    - twice-as-long rows, half as many, where they need no recomputation;
    - else 8192-token rows, or half as long and twice as many where that recomputes so many fewer layers
      that the step is faster (on an H200 within 16 GiB: 6 of 28 layers instead of 19, 1.07x)."""
    from common.config import (
        LARGE_DATA_ACCUMULATION,
        LARGE_DATA_TOKENS_PER_BATCH,
        ROOMY_TOKENS_PER_BATCH,
        TIGHT_TOKENS_PER_BATCH,
    )

    step_tokens = LARGE_DATA_TOKENS_PER_BATCH * LARGE_DATA_ACCUMULATION
    if not budget:
        return LARGE_DATA_TOKENS_PER_BATCH, LARGE_DATA_ACCUMULATION
    free = free_for_activations(config, budget, bits, loss_chunk)
    if layers_to_checkpoint(config, ROOMY_TOKENS_PER_BATCH, free, layer) == 0:
        return ROOMY_TOKENS_PER_BATCH, max(1, step_tokens // ROOMY_TOKENS_PER_BATCH)
    layers, _, _ = model_dims(config)
    costs = {}
    for tokens in (LARGE_DATA_TOKENS_PER_BATCH, TIGHT_TOKENS_PER_BATCH):
        n = layers_to_checkpoint(config, tokens, free, layer)
        costs[tokens] = step_cost_per_token(tokens, n, layers) if n is not None else math.inf
    # the longer rows unless the shorter ones are faster (ties, and nothing fitting at all, keep 8192)
    tokens = min(costs, key=lambda t: (costs[t], -t))
    return tokens, max(1, step_tokens // tokens)


# Logit elements of one slice of the loss: 2,048 positions of ChatGLM2's 65,024-word vocabulary (0.5 GiB in fp32).
LOSS_SLICE_ELEMENTS = 2048 * 65024


def loss_chunk_for(config) -> int:
    """Supervised positions per slice of the vocabulary projection: as many as keep a slice's logits at
    LOSS_SLICE_ELEMENTS (2,048 for ChatGLM2/3, 896 for ChatGLM-6B's 130,528 words), a multiple of 128."""
    return max(128, LOSS_SLICE_ELEMENTS // vocab_size(config) // 128 * 128)


def loss_bytes(config, chunk: int) -> float:
    # one slice of the vocabulary projection: bf16 logits, their fp32 copy and its gradient
    return chunk * vocab_size(config) * (2 + 4 + 4)


def budget_bytes(device: torch.device, gpu_memory_gib: float | None) -> int:
    total = torch.cuda.get_device_properties(device).total_memory
    return min(total, int(gpu_memory_gib * 2**30)) if gpu_memory_gib else total


def cap_memory(device: torch.device, gpu_memory_gib: float | None) -> None:
    """Make `gpu_memory_gib` a hard limit of this process's allocator (no-op without a cap or a GPU)."""
    if device.type != "cuda" or not gpu_memory_gib:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_bytes(device, gpu_memory_gib) / total, index)


def plan_checkpointing(mode: str, config, device: torch.device, tokens: int, gpu_memory_gib: float | None,
                       loss_chunk: int, layer: LayerActivations = LayerActivations()) -> tuple[int, str]:
    """How many decoder layers to checkpoint, and why (one line for the log)."""
    layers, _, _ = model_dims(config)
    if mode == "true":
        return layers, "all layers (gradient_checkpointing: true)"
    if mode == "false":
        return 0, "off (gradient_checkpointing: false)"
    if device.type != "cuda":
        return 0, "off (auto: not on a GPU)"
    budget = budget_bytes(device, gpu_memory_gib)
    n = layers_to_checkpoint(config, tokens, free_on_gpu(device, gpu_memory_gib, config, loss_chunk), layer)
    if n is None:
        return layers, (f"all {layers} layers (auto), and {tokens} tokens per micro-batch may still not fit "
                        f"{budget / 2**30:.1f} GiB: lower max_tokens_per_batch if it runs out of memory")
    return n, f"{n} of {layers} layers (auto: {tokens} tokens per micro-batch, {budget / 2**30:.1f} GiB budget)"


def keep_dropout_where_it_fits(layer: LayerActivations, config, tokens: int, free_bytes: float | None) -> LayerActivations:
    """LoRA's dropout kept for backward where the layers need no recompute with it (`free_bytes` for one micro-batch
    of `tokens`; None: no GPU to plan for), drawn again in backward elsewhere. Drawing it again saves memory but
    costs time: with the job's LoRA on the H200, 16,957 tokens/s against 18,328 kept (bench/NOTES.md, round 4),
    less than recomputing the layers it spares."""
    kept = replace(layer, dropout_recomputed=False)
    if layer.dropout_recomputed and free_bytes is not None and layers_to_checkpoint(config, tokens, free_bytes, kept) == 0:
        return kept
    return layer


def free_on_gpu(device: torch.device, gpu_memory_gib: float | None, config, loss_chunk: int) -> float | None:
    """What one micro-batch's activations may take on `device` now that the model is loaded (None off a GPU)."""
    if device.type != "cuda":
        return None
    budget = budget_bytes(device, gpu_memory_gib)
    return HEADROOM * budget - torch.cuda.memory_allocated(device) - loss_bytes(config, loss_chunk)


def layers_to_checkpoint(config, tokens: int, free_bytes: float,
                         layer: LayerActivations = LayerActivations()) -> int | None:
    """The fewest layers to checkpoint so one micro-batch's activations fit `free_bytes` (None: none fits)."""
    layers, _, _ = model_dims(config)
    return next((n for n in range(layers + 1) if activation_bytes(config, tokens, n, layer) <= free_bytes), None)


def decoder_layers(model) -> torch.nn.ModuleList | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    return getattr(decoder, "layers", None)


def apply_checkpointing(model, n: int) -> None:
    """Checkpoint the first `n` decoder layers (all of them where a model only has one switch)."""
    if n <= 0:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if layers is not None and all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        for layer in list(layers)[n:]:
            layer.gradient_checkpointing = False
