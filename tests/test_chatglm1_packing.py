"""Packed ChatGLM-6B rows: every example keeps its own prefix mask and 2D positions, and sees nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_dir, reference_tokenizer

from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM, example_positions
from common.models.prefix_mask import block_mask, dense_mask, token_spans, visible
from common.templates import IGNORE
from common.training.packing import packed_rows
from common.training.worker import CausalLMLoss, batch_loss_sum, example_positions_for

GMASK, SOP, EOP = 130001, 130004, 130005


@pytest.fixture(scope="module")
def tiny_glm1():
    torch.manual_seed(0)
    cfg = ChatGLM1Config(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128)
    return ChatGLM1ForCausalLM(cfg).eval()


def synthetic(prompt: int, answer: int, seed: int, sop: bool = True) -> tuple[list[int], list[int]]:
    """A ChatGLM-6B example as the template builds it: prompt [gMASK] <sop> answer <eop>, supervised from <sop>;
    `sop=False`: an example cut before its answer (no <sop>: causal throughout, as the original treats it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 20000, prompt).tolist() + [GMASK]
    if not sop:
        return ids, [IGNORE] * len(ids)
    ids += [SOP] + rng.integers(5, 20000, answer).tolist() + [EOP]
    return ids, [IGNORE] * (prompt + 1) + ids[prompt + 1:]


def logits_alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def logits_packed(model, row) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=row.input_ids, position_ids=row.position_ids, cu_seq_lens_q=row.cu_seqlens,
                     prefix_lens=row.prefix_lens, use_cache=False).logits[0]


def assert_packed_equals_alone(model, seqs):
    row = packed_rows(seqs, 4096, example_positions_for("chatglm", model.config))
    packed = logits_packed(model, row)
    at = 0
    for ids, _ in seqs:
        torch.testing.assert_close(packed[at:at + len(ids)], logits_alone(model, ids), atol=2e-5, rtol=1e-4)
        at += len(ids)
    # and the training loss of the row is the sum of the examples' losses alone
    loss = CausalLMLoss(model, None)
    alone = sum(batch_loss_sum(loss, packed_rows([s], 4096, example_positions_for("chatglm", model.config)))
                for s in seqs)
    torch.testing.assert_close(batch_loss_sum(loss, row), alone, atol=1e-4, rtol=1e-5)


def test_positions_are_the_originals_and_restart_per_example():
    cfg = ChatGLM1Config()
    ids, _ = synthetic(5, 3, 0)
    pos, prompt = example_positions(ids, cfg)
    assert prompt == 6  # the prompt and [gMASK]: everything before <sop>
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5]  # from <sop> on, the [gMASK] position
    assert pos[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]  # the block position counts the answer
    row = packed_rows([synthetic(5, 3, 0), synthetic(2, 1, 1)], 4096, example_positions_for("chatglm", cfg))
    assert row.position_ids.shape == (1, 2, 11 + 6)
    assert row.position_ids[0, :, 11:].tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]
    assert row.prefix_lens.tolist() == [6, 3]


def test_the_dense_mask_is_each_examples_own_prefix_mask_and_nothing_across():
    cu, prefix = torch.tensor([0, 5, 9, 12]), torch.tensor([3, 0, 2])
    hidden = dense_mask(cu, prefix, 12)[0, 0]
    seen = ~hidden
    assert seen[0, :3].all() and not seen[0, 3:].any()          # a prompt token sees its whole prompt
    assert seen[4, :5].all() and not seen[4, 5:].any()          # a reply token: its prompt and earlier replies
    assert seen[6, 5:7].all() and not seen[6, 7:].any()         # no prompt: causal
    assert not seen[9:, :9].any() and not seen[:9, 9:].any()    # nothing across examples


@pytest.mark.parametrize("lengths,prefixes", [
    ([300, 41, 500, 2, 180], [250, 0, 7, 1, 180]),   # examples across tile edges, one without a prompt
    ([128, 128, 256], [128, 1, 129]),                  # examples on tile edges, a prompt filling its example
    ([1000], [333]),                                    # one example, length not a multiple of the tile
])
def test_the_block_mask_equals_flex_attentions_own(lengths, prefixes):
    """Built from the boundaries without a [T, T] matrix, the tile lists equal those FlexAttention's
    create_block_mask finds by evaluating the mask at every position."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    prefix = torch.tensor(prefixes, dtype=torch.int32)
    t = int(cu[-1])
    doc, _, prompt_end = token_spans(cu, prefix, t)
    ours = block_mask(cu, prefix, t)
    theirs = create_block_mask(lambda b, h, q, k: visible(doc, prompt_end, q, k), 1, 1, t, t, device="cpu",
                               _compile=False)

    def tiles(num, idx):
        return [sorted(idx[0, 0, i, :num[0, 0, i]].tolist()) for i in range(num.shape[-1])]

    assert tiles(ours.kv_num_blocks, ours.kv_indices) == tiles(theirs.kv_num_blocks, theirs.kv_indices)
    assert tiles(ours.full_kv_num_blocks, ours.full_kv_indices) == \
        tiles(theirs.full_kv_num_blocks, theirs.full_kv_indices)
    assert ours.seq_lengths == (t, t)


def test_logits_and_loss_of_each_packed_example_equal_the_example_alone(tiny_glm1):
    seqs = [synthetic(7, 5, 0), synthetic(30, 2, 1), synthetic(4, 0, 2), synthetic(12, 0, 3, sop=False),
            synthetic(1, 9, 4)]
    assert_packed_equals_alone(tiny_glm1, seqs)


def test_the_check_can_fail_a_row_without_prefix_lengths_is_not_the_examples_alone(tiny_glm1):
    seqs = [synthetic(7, 5, 0), synthetic(9, 4, 1)]
    row = packed_rows(seqs, 4096, example_positions_for("chatglm", tiny_glm1.config))
    row.prefix_lens = torch.zeros_like(row.prefix_lens)  # every example causal: the prompts no longer see ahead
    second = logits_packed(tiny_glm1, row)[len(seqs[0][0]):]
    assert not torch.allclose(second, logits_alone(tiny_glm1, seqs[1][0]), atol=1e-3)


def test_packed_equals_alone_on_the_reference_model_with_history():
    from common.data import Conversation
    from common.models.loader import load_model, open_model_folder
    from common.templates import get_template

    model = load_model(open_model_folder(str(reference_dir("chatglm1"))), bits=16, dtype=torch.float32).eval()
    tok, template = reference_tokenizer("chatglm1"), get_template("chatglm")
    convs = [Conversation(history=[("你好", "你好！有什么可以帮你？")], query="中国的首都是哪里？", answer="北京。"),
             Conversation(history=[], query="写一首诗", answer="春眠不觉晓，处处闻啼鸟。"),
             Conversation(history=[("1+1=?", "2"), ("再加一呢", "3")], query="hello", answer="Hi!")]
    encoded = [template.encode(tok, c, train_on_history=True) for c in convs]
    assert_packed_equals_alone(model, [(e.input_ids, e.labels) for e in encoded])


def test_fifty_steps_in_packed_rows_give_the_losses_of_padded_batches(tiny_glm1):
    """The same examples, the same adapter start and optimizer: 50 optimizer steps on packed rows and on padded
    batches (the seed's way) keep losses within 0.02 of each other (in fp32 they agree far closer)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from common.training.packing import padded_rows
    from common.training.worker import make_optimizer, train_step

    rng = np.random.default_rng(0)
    batches = [[synthetic(int(rng.integers(3, 40)), int(rng.integers(1, 20)), 10 * b + i) for i in range(4)]
               for b in range(5)]
    steps = [batches[s % 5] for s in range(50)]  # seen ten times each: something to learn
    positions = example_positions_for("chatglm", tiny_glm1.config)
    losses = {}
    for how in ("packed", "padded"):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(tiny_glm1), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value", "dense_h_to_4h"]))
        loss_fn = CausalLMLoss(model, None)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        losses[how] = []
        for seqs in steps:
            batch = packed_rows(seqs, 4096, positions) if how == "packed" else padded_rows(seqs, pad_id=3)
            out = train_step(loss_fn, opt, sched, [batch], batch.num_targets, 1, 1.0)
            losses[how].append(float(out["loss_sum"]) / batch.num_targets)
    assert losses["packed"][-1] < losses["packed"][0] - 0.1  # the adapters move (a random tiny model learns slowly)
    gaps = [abs(a - b) for a, b in zip(losses["packed"], losses["padded"])]
    assert max(gaps) < 0.02, max(gaps)
