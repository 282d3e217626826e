"""Preference tuning (`--stage dpo`): the losses, the reference policy, pairs in packed rows, pair records.

The end-to-end run through Ray (2 workers, MLflow, resume) is in tests/test_finetune.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT

from common.errors import DataError
from common.templates import get_template
from common.training.epochs import InMemoryExamples, ParquetExamples, all_batches, plan_epoch
from common.training.preference import PreferenceLoss, PreferenceSettings, pair_losses
from common.training.sft import batch_loss_sum
from common.training.tokenize_cache import EncodeSpec, encode_record, tokenize

# two pairs: summed log-probabilities of each answer under the policy and the reference, and answer lengths
PC, PR, RC, RR = [-10.0, -20.0], [-14.0, -18.0], [-12.0, -19.0], [-13.0, -17.5]
NC, NR = [5.0, 8.0], [4.0, 6.0]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _by_hand(loss: str, beta: float, margin: float = 1.0, weight: float = 0.1) -> list[tuple[float, float, float]]:
    out = []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR):
        if loss == "sigmoid":
            c, r = beta * (pc - rc), beta * (pr - rr)
            out.append((-math.log(_sigmoid(c - r)), c, r))
        elif loss == "ipo":
            h = (pc - rc) - (pr - rr)
            out.append(((h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)))
        elif loss == "simpo":
            c, r = beta * pc / nc, beta * pr / nr
            out.append((-math.log(_sigmoid(c - r - margin)), c, r))
        else:  # orpo
            mc, mr = pc / nc, pr / nr
            odds = lambda m: math.log(math.exp(m) / (1 - math.exp(m)))  # noqa: E731
            out.append((-mc - weight * math.log(_sigmoid(odds(mc) - odds(mr))), mc, mr))
    return out


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("simpo", 2.0), ("orpo", 0.1)])
def test_each_loss_equals_its_hand_computed_value_on_two_pairs(loss, beta):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    got = pair_losses(PreferenceSettings(loss, beta, 1.0, 0.1), t(PC), t(PR), t(RC), t(RR), t(NC), t(NR))
    expected = _by_hand(loss, beta)
    for k in range(3):  # the loss, the chosen reward, the rejected reward of each pair
        assert got[k].tolist() == pytest.approx([e[k] for e in expected], rel=1e-9)


def _lora_model(tiny_model, bits: int = 16):
    from common.config import FinetuneConfig, load_config
    from common.training.worker import build_model

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", str(bits), "--lora_r", "8",
                                       "--lora_dropout", "0", "--gradient_checkpointing", "false"], "t", "t")
    model, tok, info = build_model(cfg, torch.device("cpu"))
    return model, tok, get_template(info.template)


@pytest.fixture(scope="module")
def pairs(tiny_model):
    """The first bundled pairs, encoded as the data pipeline stores them (chosen, then rejected)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = EncodeSpec(str(tiny_model), "chatglm2", 64, 64, False, pairs=True)
    records = json.loads((ROOT / "data/preference.json").read_text(encoding="utf-8"))[:6]
    return [encode_record(r, tok, get_template("chatglm2"), spec)[0] for r in records]


def _trained_a_little(model) -> None:
    """LoRA's B starts at zero (adapter on = base); give the adapter something to say."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)


def test_with_the_adapter_off_the_reference_is_the_base_model_exactly(tiny_model, pairs):
    from transformers import AutoModelForCausalLM

    model, _, _ = _lora_model(tiny_model)
    _trained_a_little(model)
    batch = all_batches(InMemoryExamples(pairs), epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1,
                        pad_id=0)[0]
    loss = PreferenceLoss(model, None, PreferenceSettings("sigmoid", 0.1)).eval()
    fields = dict(position_ids=batch.position_ids, supervised=batch.supervised, cu_seqlens=batch.cu_seqlens,
                  max_seqlen=batch.max_seqlen)
    reference = loss.reference_logps(batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = PreferenceLoss(base, None, PreferenceSettings("simpo", 2.0)).sequence_logps(
            batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)[0]
        policy = loss.sequence_logps(batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)[0]
    assert torch.equal(reference, plain)
    assert not torch.allclose(policy, plain, atol=1e-3)  # the adapter is on outside the reference pass


def test_a_packed_pair_gives_each_sequence_the_log_probabilities_it_has_alone(tiny_model, pairs):
    model, _, _ = _lora_model(tiny_model)
    _trained_a_little(model)
    loss = PreferenceLoss(model, None, PreferenceSettings("simpo", 2.0)).eval()

    def logps(batch):
        with torch.no_grad():
            return loss.sequence_logps(batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences,
                                       position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                                       supervised=batch.supervised, cu_seqlens=batch.cu_seqlens,
                                       max_seqlen=batch.max_seqlen)[0]

    src = InMemoryExamples(pairs)
    packed = all_batches(src, epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1, pad_id=0)
    assert len(packed) == 1 and packed[0].num_sequences == 2 * len(pairs)  # every pair whole, in one row
    padded = all_batches(src, epoch=0, seed=0, packing=False, max_tokens=4096, batch_size=len(pairs), pad_id=0)
    order = plan_epoch(src, epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1).order
    alone = []
    for i in order:
        c = pairs[i].meta["chosen_tokens"]
        for ids, labels in ((pairs[i].input_ids[:c], pairs[i].labels[:c]), (pairs[i].input_ids[c:], pairs[i].labels[c:])):
            one = InMemoryExamples([type(pairs[i])(ids, labels)])
            alone.append(logps(all_batches(one, epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1,
                                           pad_id=0)[0]))
    torch.testing.assert_close(logps(packed[0]), torch.cat(alone), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logps(padded[0]), torch.cat(alone), atol=1e-4, rtol=1e-5)


def test_each_pairs_reference_is_computed_once_and_later_epochs_reuse_it(tiny_model, pairs):
    """Epoch 1 computes the reference in the step; after the epoch's end, epoch 2's micro-batches (other pairs
    together, in another order) run no reference pass and give the loss the in-step reference gives. Eval never
    uses what training kept."""
    model, _, _ = _lora_model(tiny_model)
    _trained_a_little(model)
    loss = PreferenceLoss(model, None, PreferenceSettings("sigmoid", 0.1)).train()
    passes = []
    in_step = loss.reference_logps
    loss.reference_logps = lambda *a, **k: passes.append(1) or in_step(*a, **k)
    src = InMemoryExamples(pairs)
    batches = lambda epoch: all_batches(src, epoch=epoch, seed=0, packing=True, max_tokens=160,  # noqa: E731
                                        batch_size=1, pad_id=0)
    first, second = batches(0), batches(1)
    assert len(first) > 1 and [list(b.examples) for b in first] != [list(b.examples) for b in second]
    with torch.no_grad():
        for b in first:
            batch_loss_sum(loss, b)
        assert len(passes) == len(first) and len(loss.reference_cache) == 0  # kept, not yet read back
        loss.end_epoch()
        assert len(loss.reference_cache) == len(pairs)
        cached = [batch_loss_sum(loss, b) for b in second]
        assert len(passes) == len(first)  # no reference pass in epoch 2
        loss.reference_cache = type(loss.reference_cache)()  # forget it: the in-step reference again
        fresh = [batch_loss_sum(loss, b) for b in second]
        assert len(passes) == len(first) + len(second)
        torch.testing.assert_close(torch.stack(cached), torch.stack(fresh), atol=1e-5, rtol=1e-5)
        loss.end_epoch()
        loss.eval()
        batch_loss_sum(loss, second[0])
    assert len(passes) == len(first) + len(second) + 1


@pytest.mark.parametrize("bits", [4, 16])
def test_the_gradient_of_every_loss_reaches_only_the_adapter(tiny_model, pairs, bits):
    model, _, _ = _lora_model(tiny_model, bits)
    _trained_a_little(model)
    batch = all_batches(InMemoryExamples(pairs), epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1,
                        pad_id=0)[0]
    for name in ("sigmoid", "ipo", "simpo", "orpo"):
        model.zero_grad(set_to_none=True)
        loss = PreferenceLoss(model, None, PreferenceSettings(name, 0.1 if name != "simpo" else 2.0)).train()
        value = batch_loss_sum(loss, batch)
        assert torch.isfinite(value), name
        value.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is None for n, g in grads.items() if "lora_" not in n), name
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n), name
        sums = loss.pop_sums()
        assert sums is not None and sums.shape == (6,) and loss.pop_sums() is None


def _write(path, records) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return str(path)


GOOD = {"instruction": "中国的首都是哪里？", "chosen": "北京。", "rejected": "不知道。"}


@pytest.mark.parametrize("record,field,expected", [
    ({"instruction": "q", "rejected": "no"}, "chosen", "no such field"),
    ({"instruction": "q", "chosen": "  ", "rejected": "no"}, "chosen", "a non-empty string"),
    ({"instruction": "q", "chosen": "same", "rejected": "same"}, "rejected", "different from chosen"),
    ({"instruction": "q", "output": "a", "chosen": "x", "rejected": "y"}, "output", "no output in a preference"),
    ({"chosen": "x", "rejected": "y"}, "instruction", "no such field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "messages[1].role", "user (the prompt"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "x"}, "rejected": "y"},
     "chosen.role", "assistant"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "x"},
      "rejected": {"role": "assistant"}}, "rejected.content", "a non-empty string"),
])
def test_a_bad_pair_record_is_named_by_file_record_and_field(tmp_path, tiny_model, record, field, expected):
    data = _write(tmp_path / "pairs.jsonl", [GOOD, record])
    spec = EncodeSpec(str(tiny_model), "chatglm2", 64, 64, False, pairs=True)
    with pytest.raises(DataError) as err:
        tokenize(data, spec, tmp_path / "cache", log=lambda *_: None).check(skip_invalid=False)
    text = str(err.value)
    assert f"{data}: record 1 (line 2), field {field!r}" in text and expected in text, text


def test_records_given_to_the_wrong_stage_say_which_stage_they_need(tmp_path, tiny_model):
    sft = _write(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    spec = EncodeSpec(str(tiny_model), "chatglm2", 64, 64, False, pairs=True)
    with pytest.raises(DataError, match="field 'chosen': expected a non-empty answer") as err:
        tokenize(sft, spec, tmp_path / "cache", log=lambda *_: None).check(skip_invalid=False)
    assert "instruction records train with --stage sft" in str(err.value)
    pairs = _write(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(DataError, match="field 'output'.*train on those with --stage dpo"):
        tokenize(pairs, EncodeSpec(str(tiny_model), "chatglm2", 64, 64, False), tmp_path / "cache",
                 log=lambda *_: None).check(skip_invalid=False)


def test_both_record_shapes_reach_the_cache_as_chosen_then_rejected(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from common.data import Conversation

    records = [GOOD, {"messages": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"},
                                   {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1 加 1？"}],
                      "chosen": [{"role": "assistant", "content": "1 加 1 等于 2。"}],
                      "rejected": {"role": "assistant", "content": "3"}}]
    spec = EncodeSpec(str(tiny_model), "chatglm2", 64, 64, False, pairs=True)
    stored = tokenize(_write(tmp_path / "p.jsonl", records), spec, tmp_path / "cache", log=lambda *_: None)
    src = ParquetExamples(stored.parts)
    assert src.pairs and list(src.units) == [1, 1]
    tok, template = AutoTokenizer.from_pretrained(tiny_model), get_template("chatglm2")
    conv = Conversation(history=[("你好", "你好！")], query="1 加 1？", system="简短回答。")
    part = src.load_part(0)
    for row, (prompt, chosen, rejected) in enumerate([(Conversation([], "中国的首都是哪里？"), "北京。", "不知道。"),
                                                       (conv, "1 加 1 等于 2。", "3")]):
        got = part.sequences(row)
        for (ids, labels), answer in zip(got, (chosen, rejected)):
            want = template.encode(tok, Conversation(prompt.history, prompt.query, answer, prompt.system), 64, 64)
            assert ids.tolist() == want.input_ids and labels.tolist() == want.labels


def test_a_run_started_from_an_adapter_keeps_a_frozen_copy_of_it_as_the_reference(tiny_model, pairs, tmp_path):
    from transformers import get_scheduler

    from common.config import FinetuneConfig, load_config
    from common.training.worker import build_model, make_optimizer, train_step

    sft, _, _ = _lora_model(tiny_model)
    _trained_a_little(sft)
    sft.save_pretrained(tmp_path / "sft")
    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--stage", "dpo",
                                       "--init_adapter", str(tmp_path / "sft"), "--gradient_checkpointing", "false"],
                      "t", "t")
    model, _, _ = build_model(cfg, torch.device("cpu"))
    batch = all_batches(InMemoryExamples(pairs), epoch=0, seed=0, packing=True, max_tokens=4096, batch_size=1,
                        pad_id=0)[0]
    loss = PreferenceLoss(model, None, PreferenceSettings("sigmoid", 0.1))
    fields = dict(position_ids=batch.position_ids, supervised=batch.supervised, cu_seqlens=batch.cu_seqlens,
                  max_seqlen=batch.max_seqlen)

    def both():
        with torch.no_grad():
            ref = loss.reference_logps(batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)
            now = loss.sequence_logps(batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)
        return ref, now[0]

    with torch.no_grad():
        expected = PreferenceLoss(sft, None, PreferenceSettings("simpo")).sequence_logps(
            batch.input_ids, batch.targets, batch.sequence_of, batch.num_sequences, **fields)[0]
    ref, now = both()
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)  # the SFT model, not the base
    torch.testing.assert_close(now, expected, rtol=1e-5, atol=1e-5)  # and the policy starts there
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = make_optimizer(trainable, 1e-2, 0.0)
    out = train_step(loss, opt, get_scheduler("constant", opt), [batch], batch.num_sequences // 2, 1, 1.0)
    assert float(out["loss_sum"]) / (batch.num_sequences // 2) == pytest.approx(math.log(2), abs=1e-4)
    ref_after, now_after = both()
    assert torch.equal(ref_after, ref) and not torch.allclose(now_after, now, atol=1e-4)  # only the policy moved
    assert [p for p in model.parameters() if p.requires_grad] == trainable  # still the same (and only those)
