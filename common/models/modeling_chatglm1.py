"""ChatGLM-6B (v1) as a transformers model of our own (there is no native class).

What sets it apart from later GLMs, all reproduced from the reference data:
  - 2D rotary positions: each head is cut in two halves; the first half rotates with the token position
    (every position from <sop> on repeats the [gMASK] position), the second with the "block" position
    (0 before <sop>, then 1, 2, 3 ...). Inverse frequencies are rounded through fp16, as the original's are.
  - Attention mask: the prompt (everything before <sop>) is bidirectional, the answer causal.
  - LayerNorm with bias, GELU (tanh form), and scaled residuals: x = LN(x)·sqrt(2·28) + sublayer(LN(x)).
  - Per-layer attention score scaling 1/(sqrt(d)·(i+1)) then ×(i+1), masked with -10000, softmax in fp32.
  - The output head is tied to the input embedding (checkpoints with or without lm_head.weight load).
Parameter names equal THUDM's, so THUDM checkpoints load as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this version does.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

MASK_VALUE = -10000.0
RESIDUAL_SCALE_LAYERS = 28


class ChatGLM1Config(PretrainedConfig):
    model_type = "chatglm1"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                 inner_hidden_size=16384, layernorm_epsilon=1e-5, max_sequence_length=2048,
                 bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001,
                 pad_token_id=3, position_encoding_2d=True, use_cache=True, tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.position_encoding_2d = position_encoding_2d
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b, s, dim] for integer positions [b, s]."""
        # Computed here, not kept as a buffer: buffers are not restored by from_pretrained's meta-device init.
        # The original builds inv_freq in fp16 and only later casts it to fp32: keep the rounding.
        exponent = torch.arange(0, self.dim, 2, device=positions.device).float() / self.dim
        inv_freq = (1.0 / (self.base**exponent)).half().float()
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)

    def forward(self, x, position_ids, mask, cache: Cache | None):
        b, s, _ = x.shape
        # Per head the fused output is [q | k | v] (not all q, then all k).
        q, k, v = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        cos0, sin0 = self.rotary_emb(position_ids[:, 0], x.dtype)
        cos1, sin1 = self.rotary_emb(position_ids[:, 1], x.dtype)
        q = self._rotate_2d(q, cos0, sin0, cos1, sin1)
        k = self._rotate_2d(k, cos0, sin0, cos1, sin1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if not isinstance(mask, torch.Tensor):  # packed rows on a GPU: FlexAttention over the rows' block mask
            ctx = _flex_attention()(q, k, v, block_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
            return self.dense(ctx.transpose(1, 2).reshape(b, s, -1))
        # The original's scaling: scores divided by (i + 1) before the product and multiplied back in fp32, so
        # that fp16 does not overflow; with bf16 or fp32, as FlexAttention computes, the same softmax.
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(q / (math.sqrt(self.head_dim) * coeff), k.transpose(-1, -2))
        scores = scores.masked_fill(mask, MASK_VALUE).float() * coeff
        probs = F.softmax(scores, dim=-1).to(v.dtype)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.dense(ctx)

    @staticmethod
    def _rotate_2d(t, cos0, sin0, cos1, sin1):
        t0, t1 = t.chunk(2, dim=-1)
        cos0, sin0, cos1, sin1 = (c[:, :, None, :] for c in (cos0, sin0, cos1, sin1))
        t0 = t0 * cos0 + _rotate_half(t0) * sin0
        t1 = t1 * cos1 + _rotate_half(t1) * sin1
        return torch.cat((t0, t1), dim=-1)


def _flex_attention():
    """FlexAttention, compiled once where the caller is not compiled already (eager, it would build the whole
    [T, T] score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


_COMPILED_FLEX = None


class MLP(nn.Module):
    def __init__(self, config: ChatGLM1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(_gelu(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        # THUDM's GLMBlock never receives num_layers and uses its default of 28, whatever the depth.
        self.alpha = math.sqrt(2 * RESIDUAL_SCALE_LAYERS)

    def forward(self, hidden_states, position_ids=None, mask=None, cache=None, **kwargs):
        x = self.input_layernorm(hidden_states)
        hidden_states = x * self.alpha + self.attention(x, position_ids, mask, cache)
        x = self.post_attention_layernorm(hidden_states)
        return x * self.alpha + self.mlp(x)


class ChatGLM1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM1Config
    config: ChatGLM1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class ChatGLM1Model(ChatGLM1PreTrainedModel):
    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=True, cu_seq_lens_q=None, prefix_lens=None,
                **kwargs):
        """Packed rows (training): one row of examples back to back, with `position_ids` [1, 2, T] restarting
        per example (`example_positions`), `cu_seq_lens_q` their boundaries and `prefix_lens` their prompt
        lengths; each example then attends only to itself, with its own prefix mask (common/models/prefix_mask.py)."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache()
        if prefix_lens is not None:
            if position_ids is None or cu_seq_lens_q is None or inputs_embeds.shape[0] != 1:
                raise ValueError("packed rows need one row, its 2D position_ids and its example boundaries")
            attention_mask = packed_mask(cu_seq_lens_q, prefix_lens, inputs_embeds.shape[1], inputs_embeds.device)
        elif position_ids is None or attention_mask is None or attention_mask.dim() != 4:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("ChatGLM-6B needs position_ids and a 4D mask with a cache (use generate())")
            pad = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            pos, mask = positions_and_mask(input_ids, pad, self.config)
            position_ids = pos if position_ids is None else position_ids
            attention_mask = mask if attention_mask is None or attention_mask.dim() != 4 else attention_mask
        mask = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) else attention_mask
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_ids=position_ids, mask=mask, cache=cache)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.final_layernorm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden  # as the original: the last entry is after the final LayerNorm
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None,
                                       **{CACHE_KEY: cache})


def packed_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, length: int, device: torch.device):
    """What the layers attend with for a packed row: FlexAttention's block mask on a GPU, else the dense mask."""
    from common.models import prefix_mask

    if device.type == "cuda":
        return prefix_mask.block_mask(cu_seqlens.to(device), prefix_lens.to(device), length)
    return prefix_mask.dense_mask(cu_seqlens.to(device), prefix_lens.to(device), length)


def example_positions(ids, config: ChatGLM1Config) -> tuple[np.ndarray, int]:
    """One example's 2D positions [2, n] and its prompt length (the tokens before <sop>, seen by all; 0 when
    there is no <sop>): position 0 counts tokens up to <sop> and then stays at the [gMASK] (or [MASK]) position,
    position 1 is 0 before <sop> and then 1, 2, 3 ..."""
    row = list(ids)
    n = len(row)
    pos = np.zeros((2, n), dtype=np.int64)
    pos[0] = np.arange(n)
    if config.bos_token_id not in row:
        return pos, 0
    sop = row.index(config.bos_token_id)
    mask_tok = config.gmask_token_id if config.gmask_token_id in row else config.mask_token_id
    if mask_tok in row:
        pos[0, sop:] = row.index(mask_tok)
    pos[1, sop:] = np.arange(1, n - sop + 1)
    return pos, sop


def positions_and_mask(input_ids: torch.Tensor, pad_mask: torch.Tensor | None, config: ChatGLM1Config):
    """2D positions [b, 2, s] and the masked-out matrix [b, 1, s, s] (True = hidden) for whole sequences.

    Rows are handled one by one as the original does: the first real token is position 0 (left padding
    is skipped); the prompt up to <sop> is visible to every token; pads are never attended to."""
    b, s = input_ids.shape
    dev = input_ids.device
    ids = input_ids.tolist()
    real = pad_mask.bool() if pad_mask is not None else torch.ones(b, s, dtype=torch.bool, device=dev)
    pos = np.zeros((b, 2, s), dtype=np.int64)
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool, device=dev)).repeat(b, 1, 1)
    for r in range(b):
        start = int((~real[r]).long().cumprod(0).sum()) if pad_mask is not None else 0
        pos[r, :, start:], prompt = example_positions(ids[r][start:], config)
        allowed[r, :, :start + prompt] = True
    allowed &= real[:, None, :]
    return torch.from_numpy(pos).to(dev), (~allowed)[:, None]


class ChatGLM1ForCausalLM(ChatGLM1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.transformer = ChatGLM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, logits_to_keep=0,
                return_dict=True, **kwargs):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_hidden_states=output_hidden_states,
                               cu_seq_lens_q=kwargs.pop("cu_seq_lens_q", None),
                               prefix_lens=kwargs.pop("prefix_lens", None))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{CACHE_KEY: getattr(out, CACHE_KEY)})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      **kwargs):
        cache = cache if cache is not None else past_key_values
        pad = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        pos, mask = positions_and_mask(input_ids, pad, self.config)
        past = cache.get_seq_length() if cache is not None else 0
        return {"input_ids": input_ids[:, past:], "position_ids": pos[..., past:],
                "attention_mask": mask[:, :, past:, :], CACHE_KEY: cache if cache is not None else DynamicCache(),
                "use_cache": kwargs.get("use_cache", True), "logits_to_keep": kwargs.get("logits_to_keep", 0)}
