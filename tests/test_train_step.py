"""The worker's step runs for real with bitsandbytes 4-bit and 8-bit on CPU (no Ray needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from common.config import FinetuneConfig, load_config
from common.data import load_dataset
from common.templates import get_template
from common.training.epochs import epoch_batches
from common.training.examples import encode_records
from common.training.worker import CausalLMLoss, build_model, evaluate, train_step


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_a_few_steps_lower_the_loss_and_survive_an_eval(bits, tiny_model):
    import bitsandbytes as bnb
    from transformers import get_scheduler

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", str(bits), "--lora_r", "8",
                                       "--lora_dropout", "0", "--gradient_checkpointing", "true"], "t", "t")
    model, tok, info = build_model(cfg, torch.device("cpu"))
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(linear, {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt, 16: torch.nn.Linear}[bits])
    records = load_dataset(str(ROOT / "data/sample.json")).records[:16]
    examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
    batches = epoch_batches(examples, epoch=0, seed=0, packing=True, max_tokens=256, batch_size=1, pad_id=0)[:2]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_scheduler("constant", opt)
    n = sum(b.num_targets for b in batches)
    loss_fn = CausalLMLoss(model, None)
    losses = []
    for step in range(6):
        out = train_step(loss_fn, opt, sched, batches, n, 1, 1.0)
        losses.append(float(out["loss_sum"]) / n)
        if step == 2:  # an eval pass in between must not break the next training step (stack-notes §1.3)
            evaluate(loss_fn, batches[:1], torch.device("cpu"))
    assert losses[-1] < losses[0]


def test_the_chunked_loss_equals_plain_cross_entropy_in_value_and_gradient():
    from common.training.worker import chunked_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (g_plain,) = torch.autograd.grad(plain, hidden)
    chunked = chunked_cross_entropy_sum(head, hidden, targets, chunk=8)  # 5 slices, the last one short
    (g_chunked,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(chunked, plain, rtol=1e-5)
    assert torch.allclose(g_chunked, g_plain, atol=1e-6)


def test_the_training_loss_equals_cross_entropy_over_the_full_logits(tiny_model):
    """CausalLMLoss (decoder, supervised positions only, head slice by slice) changes cost, not the value;
    the same holds whether the supervised positions come from the host or from a boolean mask."""
    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--lora_r", "4",
                                       "--lora_dropout", "0"], "t", "t")
    model, tok, info = build_model(cfg, torch.device("cpu"))
    records = load_dataset(str(ROOT / "data/sample.json")).records[:6]
    examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
    for packing in (False, True):
        batch = epoch_batches(examples, epoch=0, seed=0, packing=packing, max_tokens=1024, batch_size=6,
                              pad_id=0)[0]
        with torch.no_grad():
            ours = CausalLMLoss(model, None)(batch.input_ids, batch.targets, position_ids=batch.position_ids,
                                             attention_mask=batch.attention_mask, cu_seqlens=batch.cu_seqlens,
                                             max_seqlen=batch.max_seqlen, supervised=batch.supervised)
            kwargs = {"attention_mask": batch.attention_mask} if not packing else {"position_ids": batch.position_ids}
            logits = model(input_ids=batch.input_ids, **kwargs).logits
            full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            # The supervised positions found on the host (no boolean mask on the device) change nothing.
            assert batch.supervised.tolist() == (batch.targets.reshape(-1) != -100).nonzero()[:, 0].tolist()
            masked = CausalLMLoss(model, None)(batch.input_ids, batch.targets, position_ids=batch.position_ids,
                                               attention_mask=batch.attention_mask, cu_seqlens=batch.cu_seqlens,
                                               max_seqlen=batch.max_seqlen, supervised=None)
        assert batch.num_targets > 50 and batch.num_targets == len(batch.supervised)
        assert torch.allclose(ours, full, rtol=1e-5), (packing, ours, full)
        assert torch.equal(ours, masked), (packing, ours, masked)


def test_the_optimizer_is_adamw_fused_on_cuda_and_the_per_tensor_loop_elsewhere():
    from common.training.worker import make_optimizer

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert not make_optimizer(cpu, 1e-3, 0.0).defaults.get("fused")
    if torch.cuda.is_available():
        gpu = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
        assert make_optimizer(gpu, 1e-3, 0.0).defaults["fused"] is True
        assert not make_optimizer(gpu, 1e-3, 0.0, fused=False).defaults.get("fused")


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                   **kwargs):
    """What varlen attention computes on a GPU (each example of a packed row attends causally within itself),
    from the example boundaries alone, in plain tensor ops a CPU can run and dynamo can trace. Calls without
    boundaries (generation) take SDPA with their mask, as on a GPU."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pos = torch.arange(query.shape[2])
    example = torch.searchsorted(cu_seq_lens_q[1:].long(), pos, right=True)
    mask = (example[:, None] == example[None, :]) & (pos[:, None] >= pos[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Packed rows take the GPU's path on this CPU: their boundaries go to every layer (`cu_seq_lens_q`)."""
    from transformers import AttentionInterface

    from common.training import attention, sft

    attention.register()
    real = AttentionInterface._global_mapping[attention.NAME]
    AttentionInterface.register(attention.NAME, rows_attention)
    monkeypatch.setattr(sft, "varlen_available", lambda device, dtype: True)
    yield
    AttentionInterface.register(attention.NAME, real)


@pytest.mark.parametrize("arch", ["glm", "glm4-0414"])
def test_compiled_decoder_layers_train_exactly_like_eager_ones_and_generate_eager(arch, request, varlen_on_cpu):
    """`--torch_compile true`: every decoder layer runs through torch.compile (the same graphs for all of them,
    and for any row length and any number of examples in a row once a second length was seen), with the same
    loss and LoRA gradients as the eager layers, through checkpointed layers too; replies generated in between
    run eager and compile nothing. The same for GLM-4-0414's layout (Glm4ForCausalLM), on packed rows with their
    boundaries passed to the layers as on a GPU."""
    tiny_model = request.getfixturevalue("tiny_model" if arch == "glm" else "tiny_glm4")
    from peft import get_peft_model_state_dict
    from torch._dynamo.utils import counters

    from common.generation import generate_replies
    from common.training.compiling import eager

    data = load_dataset(str(ROOT / "data/sample.json"))
    records, convs = data.records[:24], data.conversations()[:2]
    torch._dynamo.reset()  # as in a fresh worker: no shapes remembered as dynamic from an earlier test
    runs = {}
    for mode in ("false", "true"):
        cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--lora_r", "4",
                                           "--lora_dropout", "0", "--gradient_checkpointing", "true",
                                           "--torch_compile", mode], "t", "t")
        torch.manual_seed(0)
        model, tok, info = build_model(cfg, torch.device("cpu"))
        examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
        # rows of different lengths: a graph compiled for one length would recompile for the next
        batches = epoch_batches(examples, epoch=0, seed=0, packing=True, max_tokens=256, batch_size=1, pad_id=0)
        lengths = {b.input_ids.shape[1] for b in batches}
        # and of different example counts, which first changed mid-run on a GPU and recompiled every graph
        counts = [len(b.cu_seqlens) for b in batches]
        assert len(lengths) >= 4 and len(set(counts[2:]) - set(counts[:2])) >= 1, counts
        loss_fn = CausalLMLoss(model, None)
        losses, grads = [], []
        graphs = counters["stats"]["unique_graphs"]
        for b in batches:
            loss = loss_fn(b.input_ids, b.targets, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                           max_seqlen=b.max_seqlen, supervised=b.supervised)
            loss.backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        compiled = counters["stats"]["unique_graphs"] - graphs
        with eager():
            reply = generate_replies(model, tok, info.template, convs, torch.device("cpu"), 4)
        runs[mode] = (model.compiled_layers, compiled, torch.stack(losses), grads, reply,
                      counters["stats"]["unique_graphs"] - graphs, sorted(get_peft_model_state_dict(model)))
    layers = len(model.base_model.model.model.layers)
    assert runs["false"][:2] == (0, 0)
    n_layers, compiled, losses, grads, _, after_generation, saved = runs["true"]
    assert saved == runs["false"][6]  # a compiled model's adapter checkpoint has the same tensors
    # compiled once for the first row's length, then once more with the length dynamic, whatever comes next
    assert n_layers == layers and compiled == 2 and after_generation == compiled
    assert torch.allclose(losses, runs["false"][2], rtol=1e-5), (losses, runs["false"][2])
    assert grads.keys() == runs["false"][3].keys() and len(grads) == 2 * 6 * layers  # A and B of q, k, v, o, gate_up, down
    for name, g in grads.items():  # fp32, summed in another order by the fused kernels
        ref = runs["false"][3][name]
        assert (g - ref).norm() <= 1e-4 * ref.norm(), (name, (g - ref).norm() / ref.norm())


def test_layers_that_fail_to_compile_run_eager_under_auto_and_stop_the_run_under_true(tiny_model):
    """A compiler that cannot run here (say, no C compiler for Triton) must not cost an `auto` run its training:
    the layers run eager, with the same loss. Asked for explicitly (`true`), the failure stops the run."""
    from common.training.compiling import compile_layers

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C compiler found")

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--lora_r", "4",
                                       "--lora_dropout", "0", "--torch_compile", "false"], "t", "t")
    model, tok, info = build_model(cfg, torch.device("cpu"))
    records = load_dataset(str(ROOT / "data/sample.json")).records[:6]
    examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
    b = epoch_batches(examples, epoch=0, seed=0, packing=True, max_tokens=1024, batch_size=1, pad_id=0)[0]
    loss_fn = CausalLMLoss(model, None)

    def loss():
        with torch.no_grad():
            return loss_fn(b.input_ids, b.targets, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                           max_seqlen=b.max_seqlen, supervised=b.supervised)

    eager = loss()
    try:
        assert compile_layers(model, backend=broken_backend, fallback=True) == len(model.base_model.model.model.layers)
        assert torch.equal(loss(), eager)
        torch._dynamo.reset()
        compile_layers(model, backend=broken_backend, fallback=False)
        with pytest.raises(Exception, match="no C compiler found"):
            loss()
    finally:
        torch._dynamo.config.suppress_errors = False
        torch._dynamo.reset()


@pytest.mark.parametrize("checkpointed", ["false", "true"])
def test_compiled_layers_draw_lora_dropout_again_in_backward_with_the_forward_masks(checkpointed, tiny_model):
    """Compiled layers keep no dropout mask: LoRA's dropout is drawn again in backward. The gradient must still be
    that of the masks the forward drew: a directional derivative by finite differences (each forward from the
    same seed, so the same masks) equals the gradient's; from another seed's masks it does not. Through
    checkpointed layers too, where the whole layer is recomputed around the redrawn dropout."""
    from common.training.compiling import RecomputedDropout

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--lora_r", "4",
                                       "--lora_dropout", "0.5", "--gradient_checkpointing", checkpointed,
                                       "--torch_compile", "true"], "t", "t")
    torch.manual_seed(0)
    model, tok, info = build_model(cfg, torch.device("cpu"))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is RecomputedDropout for m in dropouts)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA B starts at zero, which would leave A's gradient (the one the masks shape) zero
        p.data.normal_(0, 0.05)
    records = load_dataset(str(ROOT / "data/sample.json")).records[:8]
    examples = encode_records(records, tok, get_template(info.template), 128, 128).examples
    b = epoch_batches(examples, epoch=0, seed=0, packing=True, max_tokens=512, batch_size=1, pad_id=0)[0]
    loss_fn = CausalLMLoss(model, None)
    model.train()

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return loss_fn(b.input_ids, b.targets, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                       max_seqlen=b.max_seqlen, supervised=b.supervised)

    def gradient(seed: int) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss(seed).backward()
        return [p.grad.clone() for p in params]

    direction = [torch.randn_like(p) for p in params]
    along = lambda grads: sum((g * d).sum() for g, d in zip(grads, direction)).item()  # noqa: E731

    @torch.no_grad()
    def difference(eps: float) -> float:
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = loss(7).item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = loss(7).item()
        for p, d in zip(params, direction):
            p.add_(eps * d)
        return (up - down) / (2 * eps)

    numeric = (4 * difference(5e-4) - difference(1e-3)) / 3  # central differences, extrapolated (Richardson)
    same, other = along(gradient(7)), along(gradient(8))
    assert abs(same - numeric) <= 1e-3 * abs(numeric), (same, numeric)
    assert abs(other - numeric) > 10 * abs(same - numeric), (other, same, numeric)


def test_compiled_layers_keep_no_dropout_mask_for_backward(tiny_model):
    """What the redrawn dropout is for: a compiled layer with LoRA dropout keeps no boolean masks and fewer bytes
    for backward than with PyTorch's dropout (bench/activation_memory.py counts it at ChatGLM2-6B's width: per
    token and layer, 125,880 bytes down to 89,016 with LoRA on q/k/v, 191,592 down to 89,064 with the job's)."""
    from common.training.compiling import RecomputedDropout, compile_layers

    cfg = load_config(FinetuneConfig, ["--base_model", str(tiny_model), "--bits", "16", "--lora_r", "4",
                                       "--lora_dropout", "0.5", "--torch_compile", "true"], "t", "t")
    model, _, _ = build_model(cfg, torch.device("cpu"))
    model.train()
    ids = torch.arange(3, 67)[None]

    def kept() -> tuple[int, int]:
        sizes, masks = {}, 0

        def pack(t):
            nonlocal masks
            masks += t.dtype == torch.bool
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=torch.arange(64)[None])
        return sum(sizes.values()), masks

    redrawn_bytes, redrawn_masks = kept()
    for module in model.modules():  # back to PyTorch's dropout, compiled again
        for name, dropout in getattr(module, "lora_dropout", {}).items():
            if isinstance(dropout, RecomputedDropout):
                module.lora_dropout[name] = torch.nn.Dropout(dropout.p)
    torch._dynamo.reset()
    compile_layers(model)
    plain_bytes, plain_masks = kept()
    assert redrawn_masks == 0 and plain_masks > 0
    assert redrawn_bytes < plain_bytes
