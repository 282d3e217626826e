"""ChatGLM-6B (our class) trains like the native models: 4/8-bit loading, LoRA targets, checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_dir

from common.models.loader import detect, load_model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_chatglm1_takes_lora_and_a_backward_step(bits):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = load_model(detect(reference_dir("chatglm1")), bits=bits, dtype=torch.float32)
    qtype = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.transformer.layers[0].attention.query_key_value, qtype)
    assert not isinstance(model.lm_head, qtype)  # the tied head stays in full precision
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"],
                                          task_type="CAUSAL_LM"))
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 74874, 130005]])
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = load_model(detect(reference_dir("chatglm1")), dtype=torch.float32)
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 74874, 130005]])
    model.train()

    def grad_of_first_qkv():
        model.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return model.transformer.layers[0].attention.query_key_value.weight.grad.clone()

    plain = grad_of_first_qkv()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grad_of_first_qkv()
    assert torch.allclose(plain, checkpointed, atol=1e-6)
