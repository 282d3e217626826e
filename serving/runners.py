"""Model runners: the forward pass of one engine step over a KV cache allocated once.

A runner owns the model's weights (the loaded transformers modules, whatever their bits) and a cache of
`num_slots` sequences of up to `max_len` tokens per layer: K and V of shape [slots + 1, kv_heads,
max_len, head_dim] (the extra slot takes the writes of padding rows). One call runs a batch of rows,
each a slot with its new tokens (a prompt chunk or one decode token) at its own position, and returns
the logits of each row's last token.

Attention reads only the positions a sequence has (GlmRunner), or the first `bucket` positions of the
cache, the next power of two (at least 256) above the longest sequence in the batch: a step's cost
follows the sequences, not `max_len`.

With an adapter pool (serving/lora.py), each row names its adapter's slot (`RowInput.lora`, -1 for the base)
and the flat runners add every row's LoRA delta at the sites they declare (`lora_sites`); a step without
adapter rows skips them. Decode graphs are captured with and without adapters, never per adapter.

  GlmRunner       ChatGLM2/3 and GLM-4 as transformers' GlmForCausalLM, GLM-4-0414 as Glm4ForCausalLM (its
                  post-attention and post-MLP norms folded into the residual adds); decode steps captured in
                  CUDA graphs per (batch, bucket)
  ChatGLM1Runner  ChatGLM-6B through our ChatGLM1ForCausalLM: the same flat step with its own small ops (2D
                  rotary, LayerNorm with the scaled residual, GELU) and a bidirectional prompt
  HFRunner        any other causal LM: one sequence at a time through its own forward and cache
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("ray.serve")

MIN_BUCKET = 256
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class RowInput:
    """One row of a step: `tokens` at positions start, start + 1, ... of the sequence in `slot`.
    `tokens=None` is a decode row whose one token is the slot's last sampled one, still on the device
    (`Runner.last_token`): the engine launches step n + 1 before it has read step n's tokens."""

    slot: int
    tokens: list[int] | None
    start: int  # position of the first token (tokens before it are in the cache)
    lora: int = -1  # the adapter pool slot of this row's adapter; -1: the base model

    @property
    def size(self) -> int:
        return 1 if self.tokens is None else len(self.tokens)


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host data onto the device without waiting for it: a plain `torch.tensor(..., device="cuda")` copies
    from pageable memory and so waits for every kernel queued before it (the step in flight included)."""
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def flat_rows(rows: list[RowInput]) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's rows as one flat list of tokens: [4, N] (token, slot, position, adapter slot; a decode row's
    token is 0 here, filled in on the device) and [R] each row's last index. Built with whole-array ops: a
    step under load holds 128 decode rows beside a prompt chunk, and a loop of small tensor writes per row cost
    ~2 ms of host time per step (measured on CPU), about a fifth of such a step's GPU time (9.5 ms on an H200)."""
    n = len(rows)
    sizes = np.fromiter((r.size for r in rows), np.int64, n)
    ends = np.cumsum(sizes)
    column = lambda values: np.repeat(np.fromiter(values, np.int64, n), sizes)  # noqa: E731 - one per row
    flat = np.empty((4, int(ends[-1])), np.int64)
    flat[0] = list(itertools.chain.from_iterable((0,) if r.tokens is None else r.tokens for r in rows))
    flat[1] = column(r.slot for r in rows)
    flat[2] = np.arange(flat.shape[1]) - np.repeat(ends - sizes, sizes) + column(r.start for r in rows)
    flat[3] = column(r.lora for r in rows)
    return torch.from_numpy(flat), torch.from_numpy(ends - 1)


def bucket_for(length: int, max_len: int) -> int:
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, max_len)


class Runner:
    family = "generic"
    chunked_prefill = True  # may a prompt be prefilled over several steps?
    # may a finished sequence's cache serve a later prompt that starts with its tokens? (a token's keys and values
    # depend only on the tokens before it; the slot's cache survives release)
    reuses_prefixes = False

    def __init__(self, model, num_slots: int, max_len: int, adapters=None):
        self.model, self.num_slots, self.max_len = model, num_slots, max_len
        self.adapters = adapters  # an AdapterPool, or None
        self.device = next(model.parameters()).device
        self.scratch = num_slots  # the slot padding rows write to
        # Each slot's last sampled token, written by the engine after sampling, read by decode rows.
        self.last_token = torch.zeros(num_slots + 1, dtype=torch.long, device=self.device)

    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """A sequence left its slot (nothing to clean: its positions are overwritten before being read)."""

    @classmethod
    def lora_sites(cls, model) -> list | None:
        """Where this runner adds LoRA deltas (serving/lora.py's Site list), or None: it serves no adapters."""
        return None


def kv_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings().weight
    return emb.dtype if emb.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


class FlatRunner(Runner):
    """Runners whose step is one flat list of tokens, each with its slot and position (`_tokens`): a decode row
    is one token, a prompt chunk is several. k and v of every token go into the cache first, then each token
    attends to its slot's cache, read in place. So a prompt chunk needs no padding, and prefill costs a few
    kernels per layer, like decode. On a GPU each decode (batch size, attention bucket) is captured once in a
    CUDA graph and replayed."""

    def __init__(self, model, num_slots: int, max_len: int, *, cuda_graphs: bool = True, adapters=None,
                 decode_gemv: str = "auto"):
        super().__init__(model, num_slots, max_len, adapters)
        self.decode_gemv = decode_gemv  # "auto": few-row projections through Triton where measured faster; "off"
        self.proj = None  # the step's projections as plain weights (`projections`), set by each runner
        self.graphs: dict[tuple[int, int, bool], tuple] = {}
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._pool = None  # one memory pool for all graphs: only one replays at a time

    def _allocate(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        shape = (layers, self.num_slots + 1, kv_heads, self.max_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def _tokens(self, tokens: torch.Tensor | None, slots: torch.Tensor, positions: torch.Tensor, bucket: int,
                last: torch.Tensor | None = None, loras: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [N] (None: each slot's last sampled token) at (slot, position) [N]; logits [R, vocab] of the
        tokens at `last` [R] (all of them when None). `bucket` bounds every position + 1. `loras` [N]: each
        token's adapter slot (-1: none), or None when no token has one."""
        raise NotImplementedError

    def projections(self, modules: dict[str, list], fused: dict[str, list] | None = None, swiglu: str | None = None):
        """The step's projections as plain weights (`modules`: name -> per-layer nn.Linear; `fused`: name ->
        per-layer (weight, bias) already), and which of them run through the few-row Triton GEMV
        (serving/kernels_gemv.py: measured against cuBLAS now, as `decode_gemv` allows); None where a layer is
        quantized (its module runs itself)."""
        from serving.kernels_gemv import Projections, pick_gemv

        if not all(type(m) is torch.nn.Linear for ms in modules.values() for m in ms):
            return None
        weights = (fused or {}) | {name: [(m.weight, m.bias) for m in ms] for name, ms in modules.items()}
        timed_against = {"silu_mul": self.ops.silu_mul} if swiglu else {}  # the step's own SwiGLU kernel
        return pick_gemv(Projections(weights, swiglu), self.device, self.decode_gemv, **timed_against)

    def _linear(self, name: str, i: int, h: torch.Tensor, module) -> torch.Tensor:
        """Layer i's projection `name` of h: through `proj` (the few-row GEMV where chosen), or the module itself
        where there is none (quantized layers)."""
        return self.proj(name, i, h) if self.proj is not None else module(h)

    def _lora(self, loras: torch.Tensor | None):
        """The step's LoRA deltas: `lora(layer, site, h, y)` adds them to a linear's output (nothing without)."""
        from serving.lora import NO_LORA

        return NO_LORA if self.adapters is None or loras is None else self.adapters.step(loras)

    def _new_prompts(self, rows: list[RowInput]) -> None:
        """Called with a step's prompt rows before they run (what a model must note of a prompt)."""

    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        longest = max(r.start + r.size for r in rows)
        bucket = bucket_for(longest, self.max_len)
        with_lora = any(r.lora >= 0 for r in rows)
        if all(r.tokens is None for r in rows):
            size = next((s for s in GRAPH_BATCH_SIZES if s >= len(rows)), None) if self.use_graphs else None
            if size is not None:
                return self._replay(rows, size, bucket, with_lora)
            host = [[r.slot for r in rows], [r.start for r in rows], [r.lora for r in rows]]
            slots, positions, loras = to_device(host, self.device)
            return self._tokens(None, slots, positions, bucket, loras=loras if with_lora else None)
        # Prompt chunks (and any decode rows among them): one flat list of tokens; logits of each row's last.
        flat, last = flat_rows(rows)
        self._new_prompts(rows)
        flat = to_device(flat, self.device)
        tokens = flat[0]
        pending = last[torch.from_numpy(np.fromiter((r.tokens is None for r in rows), bool, len(rows)))]
        if len(pending):  # decode rows mixed in: their token is on the device already
            idx = to_device(pending, self.device)
            tokens[idx] = self.last_token[flat[1][idx]]
        return self._tokens(tokens, flat[1], flat[2], bucket, to_device(last, self.device),
                            flat[3] if with_lora else None)

    # -- CUDA graphs for decode steps -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Prompts on the scratch slot: Triton compiles its kernels on first use; better at start-up than
        in a user's request. It compiles a kernel again for each kind of integer argument it sees (1, a multiple
        of 16, anything else), so the prompts are 16 and 17 tokens long. With 16 alone, the first 69-token prompt
        of the first server on a fresh machine waited ~0.3 s in the engine, the next servers' ~35 ms: compiling
        for a length that is no multiple of 16 is the likely cause (bench/NOTES.md, serving round 4)."""
        for n in (16, 17):
            self.forward([RowInput(self.scratch, [0] * min(n, self.max_len), 0)])
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def capture(self, max_batch: int, max_bucket: int) -> int:
        """Capture decode graphs for every batch size up to `max_batch` and bucket up to `max_bucket`."""
        self.warm_up()
        n = 0
        buckets = []
        b = MIN_BUCKET
        while b <= min(max_bucket, self.max_len):
            buckets.append(b)
            b *= 2
        variants = (False, True) if self.adapters is not None else (False,)
        for size in sorted((s for s in GRAPH_BATCH_SIZES if s <= max_batch), reverse=True):
            for bucket in reversed(buckets):
                for with_lora in variants:
                    self._graph(size, bucket, with_lora)
                    n += 1
        return n

    def _graph(self, size: int, bucket: int, with_lora: bool = False):
        key = (size, bucket, with_lora)
        if key in self.graphs:
            return self.graphs[key]
        dev = self.device
        static = {"slots": torch.full((size,), self.scratch, dtype=torch.long, device=dev),
                  "positions": torch.zeros(size, dtype=torch.long, device=dev),
                  "loras": torch.full((size,), -1, dtype=torch.long, device=dev)}
        args = (None, static["slots"], static["positions"], bucket, None, static["loras"] if with_lora else None)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (and their autotuning) outside the capture
                self._tokens(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._tokens(*args)
        self._pool = graph.pool()
        self.graphs[key] = (graph, static, logits)
        return self.graphs[key]

    def _replay(self, rows: list[RowInput], size: int, bucket: int, with_lora: bool = False) -> torch.Tensor:
        graph, static, logits = self._graph(size, bucket, with_lora)
        n = len(rows)
        host = torch.empty(3, size, dtype=torch.long)
        host[0, :] = self.scratch
        host[1, :] = 0
        host[2, :] = -1
        host[0, :n] = torch.tensor([r.slot for r in rows])
        host[1, :n] = torch.tensor([r.start for r in rows])
        host[2, :n] = torch.tensor([r.lora for r in rows])
        dev = to_device(host, self.device)
        static["slots"].copy_(dev[0])
        static["positions"].copy_(dev[1])
        static["loras"].copy_(dev[2])
        graph.replay()
        return logits[:n]


class GlmRunner(FlatRunner):
    """GlmForCausalLM-shaped models: embed → [RMSNorm → q/k/v → partial rotary → attention → o] + MLP.

    Per layer: the GEMMs plus five small ops (serving/kernels.py; Triton kernels on a GPU); each token attends
    to its slot's cache up to its own position. Glm4ForCausalLM (GLM-4-0414) also RMS-norms the attention's and
    the MLP's outputs before they join the residual: the residual add's kernel norms them first, so its step
    has as many kernels as GLM's."""

    reuses_prefixes = True

    family = "glm"

    def __init__(self, model, num_slots: int, max_len: int, *, cuda_graphs: bool = True, adapters=None,
                 decode_gemv: str = "auto"):
        super().__init__(model, num_slots, max_len, cuda_graphs=cuda_graphs, adapters=adapters,
                         decode_gemv=decode_gemv)
        inner = model.model
        cfg = model.config
        self.layers, self.embed, self.norm, self.rotary = inner.layers, inner.embed_tokens, inner.norm, inner.rotary_emb
        self.heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._allocate(len(self.layers), cfg.num_key_value_heads, head_dim, kv_dtype(model))
        self.eps = cfg.rms_norm_eps
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"
        # Glm4ForCausalLM: per layer, the norms of the attention's and the MLP's outputs (None: GLM has none)
        self.post_norms = [(layer.post_self_attn_layernorm.weight, layer.post_mlp_layernorm.weight)
                           if hasattr(layer, "post_mlp_layernorm") else (None, None) for layer in self.layers]
        self.qkv = [_fuse_qkv(layer.self_attn) for layer in self.layers]
        from serving.kernels import pick_ops

        # cos and sin of every position, computed once by the model's rotary module: a step looks its positions up
        # (one kernel) instead of running the module (~9 small kernels). Elementwise the same arithmetic on the
        # same numbers, so the same values.
        cos, sin = self.rotary(torch.zeros(1, dtype=self.k_cache.dtype, device=self.device),
                               torch.arange(max_len, device=self.device)[None])
        self.rope_table = torch.stack([cos[0], sin[0]], dim=1)  # [max_len, 2, rot]
        rot = cos.shape[-1]
        self.ops, self.ops_note = pick_ops(self.device, heads=self.heads, kv_heads=self.kv_heads, head_dim=head_dim,
                                           rot=rot, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                                           dtype=self.k_cache.dtype)
        self.proj = self._projections()
        if self.proj is not None and self.proj.note:
            self.ops_note = "; ".join(n for n in (self.ops_note, self.proj.note) if n)

    def _projections(self):
        """The layers' projections (q/k/v fused) for `projections`; None where the MLP is not SwiGLU."""
        if not self.silu or any(w is None for w in self.qkv):
            return None
        return self.projections({"o": [layer.self_attn.o_proj for layer in self.layers],
                                 "gate_up": [layer.mlp.gate_up_proj for layer in self.layers],
                                 "down": [layer.mlp.down_proj for layer in self.layers],
                                 "head": [self.model.lm_head]}, fused={"qkv": list(self.qkv)}, swiglu="down")

    @classmethod
    def lora_sites(cls, model) -> list:
        """Per layer: the fused QKV (q, k, v side by side), o_proj, the fused gate/up projection, down_proj."""
        from serving.lora import Site

        names = {id(m): n for n, m in model.named_modules()}

        def site(i: int, name: str, *mods) -> Site:
            parts, start = [], 0
            for m in mods:
                parts.append((names[id(m)], start, m.out_features))
                start += m.out_features
            return Site(i, name, mods[0].in_features, tuple(parts))

        sites = []
        for i, layer in enumerate(model.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            sites += [site(i, "qkv", a.q_proj, a.k_proj, a.v_proj), site(i, "o", a.o_proj),
                      site(i, "gate_up", mlp.gate_up_proj), site(i, "down", mlp.down_proj)]
        return sites

    def _qkv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.qkv[i] is not None:  # one GEMM instead of three
            return F.linear(h, *self.qkv[i])
        attn = self.layers[i].self_attn
        return torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)

    @torch.no_grad()
    def _tokens(self, tokens, slots, positions, bucket, last=None, loras=None):
        ops, proj, linear = self.ops, self.proj, self._linear
        lora = self._lora(loras)
        no_adapter = self.adapters is None or loras is None  # then nothing needs the down projection's input
        x = self.embed(self.last_token[slots] if tokens is None else tokens)
        cos, sin = self.rope_table[positions].unbind(1)
        h, h_norm = None, None  # the MLP's output, and its norm's weight (Glm4) before it joins the residual
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            post_attn, post_mlp = self.post_norms[i]
            x, h = ops.add_rms_norm(x, h, layer.input_layernorm.weight, self.eps, h_norm)
            qkv = proj("qkv", i, h) if proj else self._qkv(i, h)
            q = ops.rope_write(lora(i, "qkv", h, qkv), cos, sin, self.k_cache[i], self.v_cache[i],
                               slots, positions, self.heads, self.kv_heads)
            out = ops.decode_attention(q, self.k_cache[i], self.v_cache[i], slots, positions, attn.scaling, bucket)
            o = linear("o", i, out, attn.o_proj)
            x, h = ops.add_rms_norm(x, lora(i, "o", out, o), layer.post_attention_layernorm.weight, self.eps,
                                    post_attn)
            h_norm = post_mlp
            mlp = layer.mlp
            if not self.silu:
                h = mlp(h)
            elif proj is None:  # quantized layers: the modules themselves
                act = ops.silu_mul(lora(i, "gate_up", h, mlp.gate_up_proj(h)))
                h = lora(i, "down", act, mlp.down_proj(act))
            else:
                gate_up = lora(i, "gate_up", h, proj("gate_up", i, h))
                if no_adapter and proj.fuses_swiglu(len(gate_up)):  # SwiGLU inside the down GEMV
                    h = proj.down_swiglu(i, gate_up)
                else:
                    act = ops.silu_mul(gate_up)
                    h = lora(i, "down", act, proj("down", i, act))
        if last is not None:  # only the rows whose logits are wanted go through the final norm and the head
            x, h = x[last], h[last]
        _, h = ops.add_rms_norm(x, h, self.norm.weight, self.eps, h_norm)
        return linear("head", 0, h, self.model.lm_head).float()

def _fuse_qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """q/k/v weights as one matrix, the modules' own weights becoming views into it (no extra memory).
    None for quantized layers (bitsandbytes packs each weight on its own)."""
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not all(type(m) is torch.nn.Linear for m in mods):
        return None
    weight = torch.cat([m.weight.data for m in mods])
    bias = torch.cat([m.bias.data for m in mods]) if all(m.bias is not None for m in mods) else None
    if any(m.bias is not None for m in mods) and bias is None:
        return None
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


class ChatGLM1Runner(FlatRunner):
    """ChatGLM-6B through the flat-token step: LayerNorm with the alpha-scaled residual, 2D rotary, GELU
    (serving/kernels_chatglm1.py; Triton kernels on a GPU), its 32 heads' KV cache, decode steps in CUDA graphs.

    A prompt is bidirectional up to <sop>: each of its tokens sees the whole prompt, so a prompt is prefilled in
    one piece (`chunked_prefill = False`). Its tokens attend through the decode kernel, each reading its
    prompt in place, while prompts are short. In a step with a prompt longer than PROMPT_KERNEL_MAX (the kernel
    would read it once per token: with 32 KV heads, no grouped queries share those reads), each prompt's tokens
    before <sop> attend to each other through one flash attention call without a mask (they all see the same
    keys), and the rest (<sop>, any later token) through the kernel. Each slot keeps, on the device, where its
    <sop> and its [gMASK] are; a token's 2D position and the last position it sees follow from them and its own
    position, inside the captured graphs too."""

    family = "chatglm"
    chunked_prefill = False
    NO_SOP = 1 << 30  # a prompt without <sop>: causal throughout, positions counted as they come
    PROMPT_KERNEL_MAX = 512  # longest prompt whose tokens attend through the per-token decode kernel

    def __init__(self, model, num_slots: int, max_len: int, *, cuda_graphs: bool = True, adapters=None,
                 decode_gemv: str = "auto"):
        super().__init__(model, num_slots, max_len, cuda_graphs=cuda_graphs, adapters=adapters,
                         decode_gemv=decode_gemv)
        from serving.kernels import TorchOps, TritonOps
        from serving.kernels_chatglm1 import TritonOps1, pick_ops1, rotary_tables

        self.tr = model.transformer
        cfg = self.cfg = model.config
        self.heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // self.heads
        self._allocate(cfg.num_layers, self.heads, head_dim, kv_dtype(model))
        dtype = self.k_cache.dtype
        self.eps, self.alpha = cfg.layernorm_epsilon, self.tr.layers[0].alpha
        self.cos, self.sin = rotary_tables(head_dim // 2, max_len, dtype, self.device)
        self.sop = torch.full((num_slots + 1,), self.NO_SOP, dtype=torch.long, device=self.device)
        self.mask_at = torch.full((num_slots + 1,), -1, dtype=torch.long, device=self.device)
        self.ops, self.ops_note = pick_ops1(self.device, heads=self.heads, head_dim=head_dim, hidden=cfg.hidden_size,
                                            ffn=cfg.inner_hidden_size, dtype=dtype)
        layers = self.tr.layers
        self.proj = self.projections({"qkv": [layer.attention.query_key_value for layer in layers],
                                      "dense": [layer.attention.dense for layer in layers],
                                      "h_to_4h": [layer.mlp.dense_h_to_4h for layer in layers],
                                      "4h_to_h": [layer.mlp.dense_4h_to_h for layer in layers],
                                      "head": [model.lm_head]})
        if self.proj is not None and self.proj.note:
            self.ops_note = "; ".join(n for n in (self.ops_note, self.proj.note) if n)
        # decode attention: GLM's kernel with 32 KV heads (checked by pick_ops1 with the other ops)
        self.attend = TritonOps if self.ops is TritonOps1 else TorchOps
        self.long_prompts = False  # does this step hold a prompt longer than PROMPT_KERNEL_MAX?
        # this step's rows: (first flat token, size, slot, where <sop> is: -1 for none, 0 for decode rows)
        self.spans: list[tuple[int, int, int, int]] = []

    @classmethod
    def lora_sites(cls, model) -> list:
        """Per layer: query_key_value, dense, dense_h_to_4h, dense_4h_to_h (the job's LoRA targets)."""
        from serving.lora import Site

        names = {id(m): n for n, m in model.named_modules()}
        sites = []
        for i, layer in enumerate(model.transformer.layers):
            mods = (("qkv", layer.attention.query_key_value), ("dense", layer.attention.dense),
                    ("h_to_4h", layer.mlp.dense_h_to_4h), ("4h_to_h", layer.mlp.dense_4h_to_h))
            sites += [Site(i, name, m.in_features, ((names[id(m)], 0, m.out_features),)) for name, m in mods]
        return sites

    def _new_prompts(self, rows: list[RowInput]) -> None:
        """Note each prompt's <sop> and [gMASK] (or [MASK]) positions in its slot."""
        cfg = self.cfg
        self.long_prompts = any(r.tokens is not None and r.size > self.PROMPT_KERNEL_MAX for r in rows)
        self.spans = []
        slots, sops, masks = [], [], []
        at = 0
        for r in rows:
            at += r.size
            if r.tokens is None:
                self.spans.append((at - 1, 1, r.slot, 0))
                continue
            if r.start != 0:
                raise ValueError("ChatGLM-6B prompts are prefilled in one piece")
            toks = r.tokens
            sop = toks.index(cfg.bos_token_id) if cfg.bos_token_id in toks else self.NO_SOP
            mask = cfg.gmask_token_id if cfg.gmask_token_id in toks else cfg.mask_token_id
            self.spans.append((at - r.size, r.size, r.slot, sop if sop < self.NO_SOP else -1))
            slots.append(r.slot)
            sops.append(sop)
            masks.append(toks.index(mask) if mask in toks else -1)
        if slots:
            idx = to_device([slots, sops, masks], self.device)
            self.sop[idx[0]] = idx[1]
            self.mask_at[idx[0]] = idx[2]

    @torch.no_grad()
    def _tokens(self, tokens, slots, positions, bucket, last=None, loras=None):
        ops, linear = self.ops, self._linear
        lora = self._lora(loras)
        sop, mask_at = self.sop[slots], self.mask_at[slots]
        reply = positions >= sop
        p0 = torch.where(reply & (mask_at >= 0), mask_at, positions)  # from <sop> on: the [gMASK] position
        p1 = torch.where(reply, positions - sop + 1, 0)                # the block position
        # the last position a token sees: the whole prompt (everything before <sop>), else itself
        sees = torch.where(sop < self.NO_SOP, torch.maximum(positions, sop - 1), positions)
        long_prompts = tokens is not None and self.long_prompts
        scale = 1.0 / math.sqrt(self.head_dim)
        x = self.tr.word_embeddings(self.last_token[slots] if tokens is None else tokens)
        layers = self.tr.layers
        h = ops.residual_layer_norm(x, None, self.alpha, layers[0].input_layernorm.weight,
                                    layers[0].input_layernorm.bias, self.eps)
        for i, layer in enumerate(layers):
            a = layer.attention
            q = ops.rope2d_write(lora(i, "qkv", h, linear("qkv", i, h, a.query_key_value)), self.cos, self.sin, p0, p1,
                                 self.k_cache[i], self.v_cache[i], slots, positions, self.heads)
            if long_prompts:
                out = self._attend_long_prompts(q, self.k_cache[i], self.v_cache[i], slots, sees, scale, bucket)
            else:
                out = self.attend.decode_attention(q, self.k_cache[i], self.v_cache[i], slots, sees, scale, bucket)
            ln = layer.post_attention_layernorm
            h = ops.residual_layer_norm(h, lora(i, "dense", out, linear("dense", i, out, a.dense)), self.alpha,
                                        ln.weight, ln.bias, self.eps)
            mlp = layer.mlp
            act = ops.gelu(lora(i, "h_to_4h", h, linear("h_to_4h", i, h, mlp.dense_h_to_4h)))
            delta = lora(i, "4h_to_h", act, linear("4h_to_h", i, act, mlp.dense_4h_to_h))
            ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.tr.final_layernorm
            if last is not None and i + 1 == len(layers):  # only the rows whose logits are wanted
                h, delta = h[last], delta[last]
            h = ops.residual_layer_norm(h, delta, self.alpha, ln.weight, ln.bias, self.eps)
        return linear("head", 0, h, self.model.lm_head).float()

    def _attend_long_prompts(self, q, k_cache, v_cache, slots, sees, scale, bucket):
        """A step with a long prompt: per prompt, its tokens before <sop> see exactly the keys before <sop>: one
        flash attention call without a mask (a prompt without <sop>: one causal call over all of it); the other
        tokens (<sop>, decode rows) through the kernel, each up to the last position it sees."""
        n, heads, d = q.shape
        out = q.new_empty(n, heads * d)
        rest: list[int] = []
        for start, size, slot, sop in self.spans:
            causal = sop < 0  # no <sop>: causal throughout, all of it in one call
            seen = size if causal else sop
            if seen > 0:
                qs = q[start:start + seen].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, k_cache[slot, :, :seen][None], v_cache[slot, :, :seen][None],
                                                   is_causal=causal, scale=scale)
                out[start:start + seen] = o[0].transpose(0, 1).reshape(seen, heads * d)
            rest.extend(range(start + seen, start + size))
        if rest:
            idx = to_device(rest, self.device)
            out[idx] = self.attend.decode_attention(q[idx], k_cache, v_cache, slots[idx], sees[idx], scale, bucket)
        return out


class HFRunner(Runner):
    """Any causal LM: each row runs alone through the model's own forward and its own cache."""

    family = "generic"

    def __init__(self, model, num_slots: int, max_len: int):
        super().__init__(model, num_slots, max_len)
        self.caches: dict[int, object] = {}

    @torch.no_grad()
    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        from transformers import DynamicCache

        out = []
        for r in rows:
            cache = self.caches.get(r.slot) if r.start else None
            cache = cache if cache is not None else DynamicCache()
            ids = self.last_token[r.slot].view(1, 1) if r.tokens is None else to_device([r.tokens], self.device)
            pos = torch.arange(r.start, r.start + r.size, device=self.device)[None]
            res = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            self.caches[r.slot] = res.past_key_values
            out.append(res.logits[0, -1].float())
        return torch.stack(out)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)


def runner_class(model) -> type[Runner]:
    kind = type(model).__name__
    if kind == "ChatGLM1ForCausalLM":
        return ChatGLM1Runner
    inner = getattr(model, "model", None)
    layer = inner.layers[0] if inner is not None and hasattr(inner, "layers") else None
    if kind in ("GlmForCausalLM", "Glm4ForCausalLM") and layer is not None and hasattr(layer.mlp, "gate_up_proj"):
        return GlmRunner
    return HFRunner


def runner_for(model, num_slots: int, max_len: int, *, cuda_graphs: bool = True, adapters=None,
               decode_gemv: str = "auto") -> Runner:
    cls = runner_class(model)
    if cls is HFRunner:
        if adapters is not None:
            raise ValueError(f"{type(model).__name__} runs through the generic runner, which serves no adapters")
        return HFRunner(model, num_slots, max_len)
    return cls(model, num_slots, max_len, cuda_graphs=cuda_graphs, adapters=adapters, decode_gemv=decode_gemv)
