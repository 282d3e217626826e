"""The worker's step runs for real with bitsandbytes 4-bit and 8-bit on CPU (no Ray needed)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from conftest import ROOT

from common.config import FinetuneConfig, load_config
from common.data import load_dataset
from common.examples import encode_records
from common.packing import epoch_batches
from common.templates import get_template
from common.trainer import build_model, evaluate, train_step


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_a_few_steps_lower_the_loss_and_survive_an_eval(bits, tiny_model):
    import bitsandbytes as bnb
    from transformers import get_scheduler

    cfg = asdict(load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", str(bits), "--lora_r", "8",
                                              "--lora_dropout", "0", "--gradient_checkpointing", "true"], "t", "t"))
    model, tok, info = build_model(cfg, torch.device("cpu"))
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(linear, {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt, 16: torch.nn.Linear}[bits])
    records = load_dataset(str(ROOT / "data/sample.json")).records[:16]
    examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
    batches = epoch_batches(examples, epoch=0, seed=0, packing=True, max_tokens=256, batch_size=1, pad_id=0)[:2]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_scheduler("constant", opt)
    n = sum(b.num_targets for b in batches)
    losses = []
    for step in range(6):
        out = train_step(model, opt, sched, batches, n, 1, 1.0)
        losses.append(out["loss_sum"] / n)
        if step == 2:  # an eval pass in between must not break the next training step (stack-notes §1.3)
            evaluate(model, batches[:1], torch.device("cpu"), None)
    assert losses[-1] < losses[0]
