"""Gradient checkpointing only where memory needs it: the plan, the partial switch, the config spellings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GlmConfig

from common.config import FinetuneConfig, load_config
from common.training.memory import (
    activation_bytes,
    apply_checkpointing,
    large_data_batching,
    layers_to_checkpoint,
    model_dims,
    plan_checkpointing,
    weight_bytes,
)

GLM2_6B = GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128)


def test_more_memory_means_fewer_checkpointed_layers():
    weights_and_loss = 5.3 * 2**30
    plans = [layers_to_checkpoint(GLM2_6B, 8192, 0.9 * gib * 2**30 - weights_and_loss) for gib in (16, 24, 48, 80)]
    assert plans == sorted(plans, reverse=True) and len(set(plans)) == 4
    assert plans[-1] == 0  # an 80 GiB card needs none at 8k tokens (measured: 44.8 GiB peak without)
    assert 20 <= plans[0] < 28  # 16 GiB: most layers, not all (measured: 25 of 28, 11.4 GiB peak)


def test_the_plan_always_fits_and_says_so_when_nothing_does():
    for tokens in (1024, 4096, 16384):
        for free in (3e9, 10e9, 40e9):
            n = layers_to_checkpoint(GLM2_6B, tokens, free)
            if n is not None:
                assert activation_bytes(GLM2_6B, tokens, n) <= free
                assert n == 0 or activation_bytes(GLM2_6B, tokens, n - 1) > free
    assert layers_to_checkpoint(GLM2_6B, 65536, 1e9) is None


def test_a_card_with_room_gets_rows_twice_as_long_and_half_as_many():
    """Large-data batching: 16384-token rows x 4 (the same tokens per step) where they need no layer recomputed,
    as on an H200 (bench/NOTES.md: 1.09x there); else 8192 x 8: an 80 GiB card would recompute a third of the
    layers at 16k, and a card of unknown size (or CPU) keeps what works everywhere (a tight card: the next test)."""
    gib = 2**30
    assert large_data_batching(GLM2_6B, 4, 139.8 * gib, 2048) == (16384, 4)
    assert large_data_batching(GLM2_6B, 16, 139.8 * gib, 2048) == (16384, 4)  # bf16 weights: 12 GiB more, still room
    for budget in (None, 16 * gib, 48 * gib, 80 * gib):
        assert large_data_batching(GLM2_6B, 4, budget, 2048) == (8192, 8), budget
    assert layers_to_checkpoint(GLM2_6B, 16384, 0.9 * 80 * gib - 5.3 * gib) >= 9
    # The weights are estimated before loading, on the generous side: the 4-bit model with its bf16 embeddings
    # and head took ~4.5 GiB on the H200 before any activation.
    assert 4.2 * gib < weight_bytes(GLM2_6B, 4) < 5 * gib


def test_thudm_configs_give_the_same_dimensions_as_native_ones():
    from types import SimpleNamespace

    thudm = SimpleNamespace(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, padded_vocab_size=65024)
    assert model_dims(thudm) == model_dims(GLM2_6B) == (28, 4096, 13696)
    assert weight_bytes(thudm, 4) == weight_bytes(GLM2_6B, 4)


def test_a_thudm_chatglm2_folder_is_sized_from_its_own_config(tmp_path):
    """THUDM's ChatGLM2/3 config.json has padded_vocab_size and no vocab_size: the driver sizes it before
    any conversion, so the estimate must read that layout as it is."""
    import json

    from common.training.memory import model_shape

    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696,
                                                      "padded_vocab_size": 65024, "multi_query_group_num": 2}))
    shape = model_shape(tmp_path)
    assert large_data_batching(shape, 4, 139.8 * 2**30, 2048) == large_data_batching(GLM2_6B, 4, 139.8 * 2**30, 2048)


def test_explicit_switches_and_cpu_need_no_plan():
    dev = torch.device("cpu")
    assert plan_checkpointing("true", GLM2_6B, dev, 4096, None, 2048)[0] == 28
    assert plan_checkpointing("false", GLM2_6B, dev, 4096, None, 2048)[0] == 0
    assert plan_checkpointing("auto", GLM2_6B, dev, 4096, None, 2048) == (0, "off (auto: not on a GPU)")


def test_checkpointing_some_layers_recomputes_only_those_and_keeps_the_gradients(tiny_model):
    def grads(n_ckpt):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model.train()
        apply_checkpointing(model, n_ckpt)
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        ids = torch.arange(5, 45)[None]
        model(input_ids=ids, labels=ids).loss.backward()
        return flags, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    none_flags, none = grads(0)
    some_flags, some = grads(1)
    assert none_flags == [False] * len(none_flags)
    assert some_flags == [True] + [False] * (len(some_flags) - 1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(none, some))


@pytest.mark.parametrize("flag,expected", [("True", "true"), ("false", "false"), ("auto", "auto"), ("1", "true")])
def test_the_seed_spellings_of_the_switch_still_work(flag, expected):
    cfg = load_config(FinetuneConfig, ["--gradient_checkpointing", flag], "t", "t")
    assert cfg.gradient_checkpointing == expected


def test_a_bad_switch_or_budget_is_reported_by_name():
    from common.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, ["--gradient_checkpointing", "sometimes", "--gpu_memory_gib", "0"], "t", "t")
    text = str(err.value)
    assert "gradient_checkpointing: must be one of auto, true, false" in text and "gpu_memory_gib: must be > 0" in text


QKV = ("q_proj", "k_proj", "v_proj")


def test_compiled_layers_are_planned_from_what_they_keep_with_their_lora():
    """Bytes per token per layer, in units of (hidden + intermediate): eager layers 12 (measured with the job's
    LoRA); compiled ones what their graph saves plus what the H200 runs kept beyond it, which reproduces the
    runs' 8.0 (LoRA on q/k/v) and 11.7 (all six linears) with PyTorch's dropout. With LoRA's dropout drawn again
    in backward, LoRA keeps nothing of its inputs, whichever modules it trains (bench/activation_memory.py)."""
    from common.training.memory import LayerActivations

    unit = 4096 + 13696
    per_unit = lambda layer: layer.bytes_per_token(GLM2_6B) / unit  # noqa: E731
    assert per_unit(LayerActivations()) == 12.0
    assert per_unit(LayerActivations(QKV, 0.05, compiled=True)) == pytest.approx(8.0, rel=0.01)
    assert per_unit(LayerActivations("all-linear", 0.1, compiled=True)) == pytest.approx(11.7, rel=0.01)
    redrawn = [LayerActivations(t, 0.1, compiled=True, dropout_recomputed=True) for t in (QKV, "all-linear")]
    assert per_unit(redrawn[0]) == per_unit(redrawn[1]) == pytest.approx(5.9, rel=0.01)
    # no dropout: nothing to draw again, each LoRA module keeps its input
    assert per_unit(LayerActivations(QKV, 0.0, compiled=True, dropout_recomputed=True)) > per_unit(redrawn[0])


def test_what_compiled_layers_keep_decides_the_checkpointing_and_the_rows():
    """16 GiB (the benchmark's small setting, 8192-token rows): the eager estimate recomputed 25 layers, the compiled
    one with PyTorch's dropout 22 (13.4 GiB peak on the H200), with the dropout drawn again 19 (13.9 GiB peak,
    14,160 tokens/s). And the job's LoRA on an 80 GiB card now takes 16384-token rows, where it took 8192 before."""
    from common.training.memory import LayerActivations, loss_bytes

    gib = 2**30
    free = 0.9 * 16 * gib - 3.7 * gib - loss_bytes(GLM2_6B, 2048)  # ~3.7 GiB allocated by the 4-bit model
    kept = LayerActivations(QKV, 0.05, compiled=True)
    redrawn = LayerActivations(QKV, 0.05, compiled=True, dropout_recomputed=True)
    assert [layers_to_checkpoint(GLM2_6B, 8192, free, layer) for layer in (LayerActivations(), kept, redrawn)] == \
        [25, 22, 19]
    job = LayerActivations("all-linear", 0.1, compiled=True, dropout_recomputed=True)
    assert large_data_batching(GLM2_6B, 4, 80 * gib, 2048, LayerActivations()) == (8192, 8)
    assert large_data_batching(GLM2_6B, 4, 80 * gib, 2048, job) == (16384, 4)
    assert large_data_batching(GLM2_6B, 4, 48 * gib, 2048, job) == (8192, 8)


def test_a_tight_card_takes_shorter_rows_where_they_recompute_far_fewer_layers():
    """Within 16 GiB on the H200, 4096-token rows recomputed 6 of 28 layers and ran 14,861 tokens/s; 8192-token rows
    recomputed 19 and ran 13,945 (one run, bench/results/train_throughput.json). The cost model picks the former,
    with twice the micro-batches (the same tokens per step), and keeps 8192 where they recompute little or nothing."""
    from common.training.memory import LayerActivations, step_cost_per_token

    gib = 2**30
    redrawn = LayerActivations(QKV, 0.05, compiled=True, dropout_recomputed=True)
    assert large_data_batching(GLM2_6B, 4, 16 * gib, 2048, redrawn) == (4096, 16)
    assert large_data_batching(GLM2_6B, 4, 48 * gib, 2048, redrawn) == (8192, 8)  # no layer recomputed at 8192
    # the model reproduces the measured order and roughly the ratio (1.066x) of the two runs
    ratio = step_cost_per_token(8192, 19, 28) / step_cost_per_token(4096, 6, 28)
    assert 1.03 < ratio < 1.10
    # with nothing to save, shorter rows only add micro-batches
    assert step_cost_per_token(4096, 0, 28) > step_cost_per_token(8192, 0, 28) > step_cost_per_token(16384, 0, 28)
    # a card too small for either row length at all keeps 8192 (the worker then says to lower the budget)
    assert large_data_batching(GLM2_6B, 4, 5 * gib, 2048, redrawn) == (8192, 8)


def test_lora_dropout_is_kept_for_backward_only_where_the_card_has_room_for_it():
    """Drawing the dropout again in backward costs time (the job's LoRA on the H200: 16,957 tokens/s against 18,328
    kept): it is kept where the layers then still need no recompute, and drawn again where its memory is needed."""
    from common.training.memory import LayerActivations, keep_dropout_where_it_fits, loss_bytes

    gib = 2**30
    lean = LayerActivations("all-linear", 0.1, compiled=True, dropout_recomputed=True)

    def free(budget_gib: float) -> float:
        return 0.9 * budget_gib * gib - 4.5 * gib - loss_bytes(GLM2_6B, 2048)

    assert keep_dropout_where_it_fits(lean, GLM2_6B, 16384, free(139.8)).dropout_recomputed is False
    for budget_gib in (80, 48):  # kept, 16384-token rows would recompute layers there
        assert keep_dropout_where_it_fits(lean, GLM2_6B, 16384, free(budget_gib)) == lean
    assert keep_dropout_where_it_fits(lean, GLM2_6B, 16384, None) == lean  # no GPU to plan for: nothing to decide
    eager = LayerActivations("all-linear", 0.1)
    assert keep_dropout_where_it_fits(eager, GLM2_6B, 16384, free(139.8)) == eager  # eager layers keep it anyway


def test_the_worker_describes_its_layers_as_it_builds_them():
    """The plan's description follows the config: compiled (and the dropout drawn again) only where the worker
    compiles, the LoRA modules `auto` resolves to for the family."""
    from common.training.worker import layer_activations

    cfg = load_config(FinetuneConfig, ["--lora_dropout", "0.05"], "t", "t")
    gpu = layer_activations(cfg, "chatglm2", torch.device("cuda"))
    assert (gpu.compiled, gpu.dropout_recomputed, gpu.lora_dropout) == (True, True, 0.05)
    assert gpu.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    assert not layer_activations(cfg, "chatglm2", torch.device("cpu")).compiled
    glm1 = layer_activations(cfg, "chatglm", torch.device("cuda"))  # ChatGLM-6B's layers are compiled too
    assert glm1.compiled and glm1.lora_targets == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    off = load_config(FinetuneConfig, ["--torch_compile", "false"], "t", "t")
    assert layer_activations(off, "chatglm2", torch.device("cuda")).compiled is False
