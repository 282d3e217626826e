"""Packing puts several examples in one row without any attention across them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from common.data import Conversation
from common.templates import IGNORE, get_template
from common.training.epochs import epoch_batches
from common.training.packing import pack, packed_batch, padded_batch


def _examples(tok, n=5):
    t = get_template("chatglm2")
    return [t.encode(tok, Conversation(history=[], query=f"问题 {i} " * (i + 1), answer=f"回答 {i}。" * (2 + i)))
            for i in range(n)]


def _token_losses(model, batch) -> torch.Tensor:
    kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask
    with torch.no_grad():
        logits = model(**kwargs).logits
    return F.cross_entropy(logits[0], batch.targets[0], ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("arch", ["glm", "glm4-0414"])
def test_per_example_losses_are_the_same_packed_and_alone(arch, tiny_tokenizer, request):
    folder = request.getfixturevalue("tiny_model" if arch == "glm" else "tiny_glm4")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    examples = _examples(tiny_tokenizer)
    row = packed_batch(examples, list(range(len(examples))), max_tokens=4096)
    packed = _token_losses(model, row)
    start = 0
    for i, e in enumerate(examples):
        alone = _token_losses(model, packed_batch(examples, [i], max_tokens=4096)).sum()
        together = packed[start: start + len(e.input_ids)].sum()
        assert torch.allclose(alone, together, atol=1e-5), i
        start += len(e.input_ids)
    # The check can fail: with positions that do not restart, examples see each other.
    leaky = packed_batch(examples, list(range(len(examples))), max_tokens=4096)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    last = len(examples[-1].input_ids)
    alone = _token_losses(model, packed_batch(examples, [len(examples) - 1], max_tokens=4096)).sum()
    assert not torch.allclose(_token_losses(model, leaky)[-last:].sum(), alone, atol=1e-3)


def test_no_example_predicts_the_next_ones_first_token(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 3)
    row = packed_batch(examples, [0, 1, 2], max_tokens=4096)
    ends = torch.tensor([len(e.input_ids) for e in examples]).cumsum(0) - 1
    assert (row.targets[0, ends] == IGNORE).all()


def test_packing_respects_the_token_budget_and_keeps_every_example(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 5) * 6
    rows = pack(examples, list(range(len(examples))), max_tokens=120)
    assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in r) <= 120 for r in rows)


def test_padded_batches_mask_their_pads(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 3)
    b = padded_batch(examples, [0, 2], pad_id=0)
    assert b.attention_mask.sum().item() == b.num_tokens == len(examples[0].input_ids) + len(examples[2].input_ids)
    assert (b.targets[b.attention_mask == 0] == IGNORE).all()


def test_epoch_order_is_deterministic_and_changes_between_epochs(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 5) * 4
    kw = {"seed": 3, "packing": True, "max_tokens": 100, "batch_size": 1, "pad_id": 0}
    a0, b0, a1 = (epoch_batches(examples, epoch=e, **kw) for e in (0, 0, 1))
    assert [x.input_ids.tolist() for x in a0] == [x.input_ids.tolist() for x in b0]
    assert [x.input_ids.tolist() for x in a0] != [x.input_ids.tolist() for x in a1]


def test_a_model_switched_to_varlen_attention_keeps_sdpa_results_without_boundaries(tiny_model, tiny_tokenizer):
    """Generation and padded batches carry no example boundaries: they must get plain SDPA with masks."""
    from common.training.attention import NAME, use_varlen

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = padded_batch(_examples(tiny_tokenizer, 3), [0, 1, 2], pad_id=0)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        greedy = model.generate(batch.input_ids[:1, :8], max_new_tokens=6, do_sample=False)
        use_varlen(model)
        assert model.config._attn_implementation == NAME
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.equal(model.generate(batch.input_ids[:1, :8], max_new_tokens=6, do_sample=False), greedy)
    real = batch.attention_mask.bool()
    assert torch.allclose(before[real], after[real], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention needs CUDA")
def test_varlen_attention_keeps_every_example_to_itself_on_gpu(tiny_model, tiny_tokenizer):
    from common.training.attention import varlen_available
    from common.training.worker import CausalLMLoss

    if not varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this PyTorch has no varlen_attn")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda().eval()
    loss = CausalLMLoss(model, torch.bfloat16)
    assert loss.varlen
    examples = _examples(tiny_tokenizer)

    def run(b):
        b = b.to("cuda")
        with torch.no_grad():
            return float(loss(b.input_ids, b.targets, b.position_ids, None, b.cu_seqlens, b.max_seqlen))

    packed = run(packed_batch(examples, list(range(len(examples))), max_tokens=4096))
    alone = sum(run(packed_batch(examples, [i], max_tokens=4096)) for i in range(len(examples)))
    assert abs(packed - alone) / alone < 1e-3
    # The check can fail: one boundary list for the whole row lets examples see each other.
    leaky = packed_batch(examples, list(range(len(examples))), max_tokens=4096)
    leaky.cu_seqlens = torch.tensor([0, leaky.input_ids.shape[1]], dtype=torch.int32)
    leaky.max_seqlen = leaky.input_ids.shape[1]
    assert abs(run(leaky) - alone) / alone > 1e-3


class _Encoded:
    def __init__(self, n_tokens: int):
        self.input_ids = [5] * n_tokens
        self.labels = [IGNORE] * (n_tokens // 2) + [5] * (n_tokens - n_tokens // 2)


def _fit(n_examples: int, n_tokens: int = 100, **given):
    from common.training.epochs import InMemoryExamples, fit_batching

    kw = dict(packing=True, workers=1, batch_size=1, seed=0, max_tokens=None, accumulation=None, large_tokens=8192,
              large_accumulation=8, min_steps=10)
    return fit_batching(InMemoryExamples([_Encoded(n_tokens) for _ in range(n_examples)]), **{**kw, **given})


def test_large_data_keeps_the_large_data_batching():
    fit = _fit(10_000)  # 1,000,000 tokens: 123 rows of 8192 -> 16 steps of 8
    assert (fit.max_tokens, fit.accumulation, fit.steps_per_epoch) == (8192, 8, 16)


def test_small_data_shrinks_the_accumulation_first_then_the_token_budget():
    fit = _fit(500)  # 50,000 tokens: 7 rows of 8192; 1 per step -> 7 steps, so the budget halves to 4096
    assert (fit.max_tokens, fit.accumulation) == (4096, 1) and fit.steps_per_epoch >= 10
    mid = _fit(2_000)  # 25 rows of 8192: accumulation 2 gives 13 steps
    assert (mid.max_tokens, mid.accumulation, mid.steps_per_epoch) == (8192, 2, 13)


def test_a_handful_of_records_gets_rows_of_one_example_never_shorter_than_the_longest():
    fit = _fit(6, n_tokens=70)  # fewer examples than steps wanted: the smallest batching, 80-token rows
    assert (fit.max_tokens, fit.accumulation, fit.steps_per_epoch) == (80, 1, 6)


def test_given_settings_are_never_changed():
    fit = _fit(500, max_tokens=8192, accumulation=4)
    assert (fit.max_tokens, fit.accumulation, fit.steps_per_epoch) == (8192, 4, 2)
    only_tokens = _fit(500, max_tokens=8192)  # the accumulation alone adapts
    assert (only_tokens.max_tokens, only_tokens.accumulation) == (8192, 1)


def test_padded_batches_adapt_only_the_accumulation():
    fit = _fit(40, packing=False, batch_size=2)  # 20 batches of 2: accumulation 2 -> 10 steps
    assert (fit.accumulation, fit.steps_per_epoch) == (2, 10)
