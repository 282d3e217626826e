"""Model runners: the forward pass of one engine step over a KV cache allocated once.

A runner owns the model's weights (the loaded transformers modules, whatever their bits) and a cache of
`num_slots` sequences of up to `max_len` tokens per layer: K and V of shape [slots + 1, kv_heads,
max_len, head_dim] (the extra slot takes the writes of padding rows). One call runs a batch of rows,
each a slot with its new tokens (a prompt chunk or one decode token) at its own position, and returns
the logits of each row's last token.

Attention reads only the first `bucket` positions of the cache, the next power of two (at least 256)
above the longest sequence in the batch: a step's cost follows the sequences, not `max_len`.

  GlmRunner       ChatGLM2/3 and GLM-4 as transformers' GlmForCausalLM (and Llama-shaped layouts with
                  the same module names); decode steps captured in CUDA graphs per (batch, bucket)
  ChatGLM1Runner  ChatGLM-6B through our ChatGLM1ForCausalLM: 2D positions, bidirectional prompt
  HFRunner        any other causal LM: one sequence at a time through its own forward and cache
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("ray.serve")

MIN_BUCKET = 256
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class RowInput:
    slot: int
    tokens: list[int]
    start: int  # position of tokens[0] in the sequence (tokens before it are in the cache)


def bucket_for(length: int, max_len: int) -> int:
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, max_len)


class Runner:
    family = "generic"
    chunked_prefill = True  # may a prompt be prefilled over several steps?

    def __init__(self, model, num_slots: int, max_len: int):
        self.model, self.num_slots, self.max_len = model, num_slots, max_len
        self.device = next(model.parameters()).device
        self.scratch = num_slots  # the slot padding rows write to

    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """A sequence left its slot (nothing to clean: its positions are overwritten before being read)."""


def kv_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings().weight
    return emb.dtype if emb.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


class _CacheRunner(Runner):
    """Shared by the runners that keep their own cache: allocation, writes, reads, padded inputs."""

    def _allocate(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        shape = (layers, self.num_slots + 1, kv_heads, self.max_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def _inputs(self, rows: list[RowInput], pad_rows: int = 0):
        """Padded [B, T] tokens and positions, write slots [B, T] (scratch for padding), read slots [B],
        the index of each row's last real token, and the attention bucket."""
        t = max(len(r.tokens) for r in rows)
        b = len(rows) + pad_rows
        tokens = torch.zeros(b, t, dtype=torch.long)
        positions = torch.zeros(b, t, dtype=torch.long)
        write = torch.full((b, t), self.scratch, dtype=torch.long)
        read = torch.full((b,), self.scratch, dtype=torch.long)
        last = torch.zeros(b, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.tokens)
            tokens[i, :n] = torch.tensor(r.tokens)
            positions[i, :n] = torch.arange(r.start, r.start + n)
            write[i, :n] = r.slot
            read[i] = r.slot
            last[i] = n - 1
        longest = max(r.start + len(r.tokens) for r in rows)
        dev = self.device
        return (tokens.to(dev), positions.to(dev), write.to(dev), read.to(dev), last.to(dev),
                bucket_for(longest, self.max_len))

    def _write(self, layer: int, write: torch.Tensor, positions: torch.Tensor, k, v) -> None:
        """k, v [B, T, kv, d] into the cache at (slot, position) of every token."""
        self.k_cache[layer][write, :, positions] = k
        self.v_cache[layer][write, :, positions] = v

    def _read(self, layer: int, read: torch.Tensor, bucket: int):
        # Slice first, then gather: only `bucket` positions of each row are copied.
        return self.k_cache[layer][:, :, :bucket][read], self.v_cache[layer][:, :, :bucket][read]


class GlmRunner(_CacheRunner):
    """GlmForCausalLM-shaped models: embed → [RMSNorm → q/k/v → partial rotary → attention → o] + MLP."""

    family = "glm"

    def __init__(self, model, num_slots: int, max_len: int, *, cuda_graphs: bool = True,
                 compile_small_ops: bool = True):
        super().__init__(model, num_slots, max_len)
        inner = model.model
        cfg = model.config
        self.layers, self.embed, self.norm, self.rotary = inner.layers, inner.embed_tokens, inner.norm, inner.rotary_emb
        self.heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._allocate(len(self.layers), cfg.num_key_value_heads, head_dim, kv_dtype(model))
        from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

        self.apply_rotary, self.rms_norm, self.swiglu = apply_rotary_pos_emb, rms_norm, swiglu
        self.eps = cfg.rms_norm_eps
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"
        self.qkv = [_fuse_qkv(layer.self_attn) for layer in self.layers]
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        if self.use_graphs and compile_small_ops:
            # The GEMMs are cuBLAS either way; what a decode step of a 6B model loses to is ~50 tiny kernels
            # per layer (norms, rotary, SwiGLU). Compiled, each of those groups is one fused kernel.
            self.apply_rotary, self.rms_norm, self.swiglu = (torch.compile(f, dynamic=True, fullgraph=True) for f in
                                                             (apply_rotary_pos_emb, rms_norm, swiglu))
        self._pool = None  # one memory pool for all graphs: only one replays at a time

    @torch.no_grad()
    def _forward(self, tokens, positions, write, read, last, bucket) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions)
        keys = torch.arange(bucket, device=tokens.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, bucket]
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self.rms_norm(x, layer.input_layernorm.weight, self.eps)
            if self.qkv[i] is not None:  # one GEMM instead of three
                q, k, v = F.linear(h, *self.qkv[i]).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                                           self.kv_heads * self.head_dim], dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = k.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            self._write(i, write, positions, k.transpose(1, 2), v.transpose(1, 2))
            kc, vc = self._read(i, read, bucket)
            # Grouped queries without repeating K/V: each KV head serves its `groups` query heads as rows.
            qg = q.reshape(b, self.kv_heads, groups * t, self.head_dim)
            mg = mask.expand(b, 1, t, bucket).repeat(1, 1, groups, 1) if groups > 1 else mask
            out = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mg, scale=attn.scaling)
            out = out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
            x = x + attn.o_proj(out)
            h = self.rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + (mlp.down_proj(self.swiglu(mlp.gate_up_proj(h))) if self.silu else mlp(h))
        x = self.rms_norm(x, self.norm.weight, self.eps)
        return self.model.lm_head(x[torch.arange(b, device=x.device), last]).float()

    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        decode = all(len(r.tokens) == 1 for r in rows)
        if decode and self.use_graphs:
            size = next((s for s in GRAPH_BATCH_SIZES if s >= len(rows)), None)
            if size is not None:
                return self._replay(rows, size)
        return self._forward(*self._inputs(rows))[: len(rows)]

    # -- CUDA graphs for decode steps -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run prefill-shaped batches once on the scratch slot: torch.compile specializes sizes 1 and >1
        separately, so the first few new shapes recompile; better at start-up than in a user's request."""
        for rows, length in ((1, 16), (2, 16), (3, 24), (1, 1), (2, 1), (5, 1)):
            self._forward(*self._inputs([RowInput(self.scratch, [0] * length, 0)] * rows))
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
        for size in sorted((s for s in GRAPH_BATCH_SIZES if s <= max_batch), reverse=True):
            for bucket in reversed(buckets):
                self._graph(size, bucket)
                n += 1
        return n

    def _graph(self, size: int, bucket: int):
        key = (size, bucket)
        if key in self.graphs:
            return self.graphs[key]
        dev = self.device
        static = {"tokens": torch.zeros(size, 1, dtype=torch.long, device=dev),
                  "positions": torch.zeros(size, 1, dtype=torch.long, device=dev),
                  "write": torch.full((size, 1), self.scratch, dtype=torch.long, device=dev),
                  "read": torch.full((size,), self.scratch, dtype=torch.long, device=dev),
                  "last": torch.zeros(size, dtype=torch.long, device=dev)}
        args = (static["tokens"], static["positions"], static["write"], static["read"], static["last"], bucket)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (and their autotuning) outside the capture
                self._forward(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(*args)
        self._pool = graph.pool()
        self.graphs[key] = (graph, static, logits)
        return self.graphs[key]

    def _replay(self, rows: list[RowInput], size: int) -> torch.Tensor:
        longest = max(r.start + 1 for r in rows)
        graph, static, logits = self._graph(size, bucket_for(longest, self.max_len))
        n = len(rows)
        host = torch.zeros(4, size, dtype=torch.long)
        host[2:, :] = self.scratch
        host[0, :n] = torch.tensor([r.tokens[0] for r in rows])
        host[1, :n] = torch.tensor([r.start for r in rows])
        host[2, :n] = torch.tensor([r.slot for r in rows])
        host[3, :n] = host[2, :n]
        dev = host.to(self.device, non_blocking=True)
        static["tokens"].copy_(dev[0, :, None])
        static["positions"].copy_(dev[1, :, None])
        static["write"].copy_(dev[2, :, None])
        static["read"].copy_(dev[3])
        graph.replay()
        return logits[:n]


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GlmRMSNorm's arithmetic, step for step (fp32 statistics, weight applied in the input dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """GlmMLP's activation: the fused projection's halves, up * silu(gate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


class ChatGLM1Runner(_CacheRunner):
    """ChatGLM-6B: 2D rotary positions and a bidirectional prompt (everything before <sop>).

    A prompt is prefilled in one piece (its bidirectional part needs all of it); answer tokens then take
    position (mask position, 1, 2, ...) as in THUDM's original."""

    family = "chatglm"
    chunked_prefill = False

    def __init__(self, model, num_slots: int, max_len: int):
        super().__init__(model, num_slots, max_len)
        self.tr = model.transformer
        cfg = model.config
        self.cfg = cfg
        self.heads = cfg.num_attention_heads
        self._allocate(cfg.num_layers, self.heads, cfg.hidden_size // self.heads, kv_dtype(model))
        self.prompt_info: dict[int, tuple[int, int]] = {}  # slot -> (context length up to <sop>, mask position)

    def _positions(self, r: RowInput) -> tuple[torch.Tensor, torch.Tensor]:
        """2D positions [2, n] and the context length for the row's new tokens."""
        from common.models.modeling_chatglm1 import positions_and_mask

        if r.start == 0:
            ids = torch.tensor([r.tokens])
            pos, _ = positions_and_mask(ids, None, self.cfg)
            row = r.tokens
            sop = row.index(self.cfg.bos_token_id) if self.cfg.bos_token_id in row else len(row)
            self.prompt_info[r.slot] = (sop, int(pos[0, 0, -1]))
            return pos[0]
        sop, mpos = self.prompt_info[r.slot]
        n = len(r.tokens)
        block = torch.arange(r.start - sop + 1, r.start - sop + 1 + n)
        return torch.stack([torch.full((n,), mpos), block])

    @torch.no_grad()
    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        tokens, positions, write, read, last, bucket = self._inputs(rows)
        b, t = tokens.shape
        pos2d = torch.zeros(b, 2, t, dtype=torch.long)
        context = torch.zeros(b, dtype=torch.long)
        for i, r in enumerate(rows):
            pos2d[i, :, : len(r.tokens)] = self._positions(r)
            context[i] = self.prompt_info[r.slot][0]
        pos2d, context = pos2d.to(self.device), context.to(self.device)
        keys = torch.arange(bucket, device=self.device)
        allowed = (keys[None, None, :] <= positions[:, :, None]) | (keys[None, None, :] < context[:, None, None])
        allowed &= keys[None, None, :] <= (positions.max(dim=1).values)[:, None, None]
        hidden_mask = ~allowed[:, None]  # [B, 1, T, bucket], True = hidden
        x = self.tr.word_embeddings(tokens)
        for i, layer in enumerate(self.tr.layers):
            a = layer.attention
            h = layer.input_layernorm(x)
            q, k, v = a.query_key_value(h).view(b, t, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
            cos0, sin0 = a.rotary_emb(pos2d[:, 0], h.dtype)
            cos1, sin1 = a.rotary_emb(pos2d[:, 1], h.dtype)
            q, k = a._rotate_2d(q, cos0, sin0, cos1, sin1), a._rotate_2d(k, cos0, sin0, cos1, sin1)
            self._write(i, write, positions, k, v)
            kc, vc = self._read(i, read, bucket)
            coeff = float(i + 1)
            scores = torch.matmul(q.transpose(1, 2) / (math.sqrt(self.head_dim) * coeff), kc.transpose(-1, -2))
            scores = scores.masked_fill(hidden_mask, -10000.0).float() * coeff
            probs = F.softmax(scores, dim=-1).to(vc.dtype)
            ctx = torch.matmul(probs, vc).transpose(1, 2).reshape(b, t, -1)
            x = h * layer.alpha + a.dense(ctx)
            h = layer.post_attention_layernorm(x)
            x = h * layer.alpha + layer.mlp(h)
        x = self.tr.final_layernorm(x)
        return self.model.lm_head(x[torch.arange(b, device=x.device), last]).float()

    def release(self, slot: int) -> None:
        self.prompt_info.pop(slot, None)


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
            ids = torch.tensor([r.tokens], device=self.device)
            pos = torch.arange(r.start, r.start + len(r.tokens), device=self.device)[None]
            res = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            self.caches[r.slot] = res.past_key_values
            out.append(res.logits[0, -1].float())
        return torch.stack(out)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)


def runner_for(model, num_slots: int, max_len: int, *, cuda_graphs: bool = True) -> Runner:
    kind = type(model).__name__
    if kind == "ChatGLM1ForCausalLM":
        return ChatGLM1Runner(model, num_slots, max_len)
    inner = getattr(model, "model", None)
    layer = inner.layers[0] if inner is not None and hasattr(inner, "layers") else None
    if kind == "GlmForCausalLM" and layer is not None and hasattr(layer.mlp, "gate_up_proj"):
        return GlmRunner(model, num_slots, max_len, cuda_graphs=cuda_graphs)
    return HFRunner(model, num_slots, max_len)
