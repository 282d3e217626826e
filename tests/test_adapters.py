"""LoRA adapters chosen per request in the engine (serving/lora.py): rows of different adapters and of the base
in one step give what each adapter's merged model gives alone; a pool of one slot evicts and reloads; adapters
that cannot go on the model fail their own request only."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch
from test_engine import _wide_tiny_chatglm1, greedy, run_all
from transformers import AutoModelForCausalLM

from serving.engine import Engine, EngineConfig
from serving.lora import Adapter, AdapterPool
from serving.runners import RowInput, runner_class, runner_for
from serving.sampling import SamplingParams

GLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
PROMPTS = [list(range(5, 23)), [30, 31, 32], list(range(40, 47)), [50] * 40, [60, 61], list(range(70, 100))]


def make_adapter(model, folder, *, r: int, seed: int, targets=GLM_TARGETS, alpha: int = 16, **extra) -> Adapter:
    """A PEFT LoRA adapter with random A and B (PEFT's own init_lora_weights=False), saved as a user's is."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                 init_lora_weights=False, **extra))
    peft_model.save_pretrained(folder)
    return Adapter(folder.name, str(folder))


def merged(model, adapter: Adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), adapter.folder).merge_and_unload().eval()


def start(model, max_loras: int, slots: int = 4, max_rank: int = 16, chunk: int = 16) -> Engine:
    pool = AdapterPool(runner_class(model).lora_sites(model), max_loras, max_rank, torch.float32, torch.device("cpu"))
    return Engine(runner_for(model, slots, 512, adapters=pool), EngineConfig(slots, 512, 32, chunk),
                  model.config.vocab_size)


async def collect_with(engine, prompt, n, adapter, delay):
    await asyncio.sleep(delay)
    req = engine.submit(prompt, SamplingParams(n, temperature=0, min_tokens=n), [], adapter)
    out = []
    while True:
        item = await req.queue.get()
        if isinstance(item, dict):
            return out, item
        out.append(item)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # two ranks (8 pads to the pool's 16), one adapter on the attention only
    return [make_adapter(tiny, root / "a", r=8, seed=1), make_adapter(tiny, root / "b", r=16, seed=2),
            make_adapter(tiny, root / "c", r=4, seed=3, targets=["q_proj", "v_proj"], use_rslora=True)]


def test_rows_of_three_adapters_and_the_base_in_one_step_reply_as_each_merged_model_alone(tiny, adapters):
    jobs = [(p, 10, [None, *adapters][i % 4]) for i, p in enumerate(PROMPTS * 2)]  # 12 requests, 4 slots
    engine = start(tiny, max_loras=3)
    try:
        got = run_all(engine, lambda: [collect_with(engine, p, n, a, 0.005 * i) for i, (p, n, a) in enumerate(jobs)])
        stats = engine.stats()
        metrics = engine.metrics.text()
    finally:
        engine.shutdown()
    models = {None: tiny, **{a.folder: merged(tiny, a) for a in adapters}}
    for (out, end), (p, n, a) in zip(got, jobs):
        assert end["finish_reason"] == "length"
        assert out == greedy(models[a.folder if a else None], p, n), (a, p)
    # the adapters change the replies: the test above could not pass by ignoring them
    for a in adapters:
        assert greedy(models[a.folder], PROMPTS[0], 10) != greedy(tiny, PROMPTS[0], 10)
    assert sorted(stats["adapters_loaded"]) == sorted(a.folder for a in adapters)
    assert "glmops_adapter_loads_total 3.0" in metrics and "glmops_adapter_evictions_total 0.0" in metrics


def test_one_slot_alternating_two_adapters_evicts_and_reloads_and_stays_correct(tiny, adapters):
    a, b = adapters[:2]
    jobs = [(PROMPTS[i % len(PROMPTS)], 6, (a, b)[i % 2]) for i in range(6)]
    engine = start(tiny, max_loras=1, slots=2)
    try:
        got = run_all(engine, lambda: [collect_with(engine, p, n, ad, 0.002 * i) for i, (p, n, ad) in enumerate(jobs)])
        metrics = engine.metrics.text()
    finally:
        engine.shutdown()
    models = {x.folder: merged(tiny, x) for x in (a, b)}
    for (out, end), (p, n, ad) in zip(got, jobs):
        assert end["finish_reason"] == "length" and out == greedy(models[ad.folder], p, n)
    evictions = float(next(x for x in metrics.splitlines() if x.startswith("glmops_adapter_evictions_total")).split()[1])
    assert evictions >= 1


def test_an_adapter_that_cannot_go_on_the_model_fails_its_own_request_and_says_why(tiny, adapters, tmp_path):
    from transformers import GlmConfig, GlmForCausalLM

    other = GlmForCausalLM(GlmConfig(vocab_size=tiny.config.vocab_size, hidden_size=48, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                     pad_token_id=0))
    wrong_base = make_adapter(other, tmp_path / "other-base", r=8, seed=4)
    too_wide = make_adapter(tiny, tmp_path / "rank-32", r=32, seed=5)
    dora = make_adapter(tiny, tmp_path / "dora", r=8, seed=6, use_dora=True)
    engine = start(tiny, max_loras=2)
    try:
        got = run_all(engine, lambda: [collect_with(engine, PROMPTS[1], 4, x, 0)
                                       for x in (wrong_base, too_wide, dora, adapters[0], None)])
    finally:
        engine.shutdown()
    (_, e1), (_, e2), (_, e3), (ok, e4), (base, e5) = got
    assert e1["error"] == "adapter_failed" and "trained on another base" in e1["message"]
    assert "rank 32 is above this server's max_lora_rank of 16" in e2["message"]
    assert "use_dora" in e3["message"] and "merge it instead" in e3["message"]
    assert e4["finish_reason"] == e5["finish_reason"] == "length" and len(ok) == len(base) == 4


def test_step_logits_with_adapters_equal_the_peft_models_for_chatglm_6b(tmp_path):
    """ChatGLM-6B's sites (query_key_value, dense, dense_h_to_4h, dense_4h_to_h): a prefill step and decode steps
    of two adapters and the base side by side equal each PEFT model's own forward (unmerged)."""
    from peft import PeftModel

    model = _wide_tiny_chatglm1()
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    ads = [make_adapter(model, tmp_path / f"g{i}", r=4, seed=10 + i, targets=targets) for i in range(2)]
    pool = AdapterPool(runner_class(model).lora_sites(model), 2, 8, torch.float32, torch.device("cpu"))
    runner = runner_for(model, 3, 128, adapters=pool)
    slots = [_load_now(pool, a) for a in ads] + [-1]
    refs = [PeftModel.from_pretrained(copy.deepcopy(model), a.folder).eval() for a in ads] + [model]
    seqs = [[5 + j % 700 for j in range(9)] + [130001, 130004] for _ in range(3)]
    logits = runner.forward([RowInput(i, seq, 0, slots[i]) for i, seq in enumerate(seqs)])
    for _ in range(3):
        for i, seq in enumerate(seqs):
            with torch.no_grad():
                expected = refs[i](input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)
            seq.append(int(expected.argmax()))
            runner.last_token[i] = seq[-1]
        logits = runner.forward([RowInput(i, None, len(seq) - 1, slots[i]) for i, seq in enumerate(seqs)])
    assert not torch.equal(logits[0], logits[2])


def _load_now(pool: AdapterPool, adapter: Adapter) -> int:
    deadline = time.time() + 30
    while (slot := pool.acquire(adapter)) is None:
        assert time.time() < deadline
        time.sleep(0.01)
    return slot



def test_on_an_nf4_base_adapter_rows_reply_as_the_peft_model_on_that_base(tiny_model, adapters):
    """bits=4: the base's linears are bitsandbytes NF4 (q, k, v unfused); each adapter's delta goes on top, as
    PEFT applies it to the same quantized base."""
    from peft import PeftModel

    from common.models.loader import detect, load_model

    def nf4():
        return load_model(detect(tiny_model), bits=4, dtype=torch.float32).eval()

    base = nf4()
    jobs = [(p, 8, [None, *adapters[:2]][i % 3]) for i, p in enumerate(PROMPTS)]
    engine = start(base, max_loras=2)
    try:
        got = run_all(engine, lambda: [collect_with(engine, p, n, a, 0.005 * i) for i, (p, n, a) in enumerate(jobs)])
    finally:
        engine.shutdown()
    refs = {None: base, **{a.folder: PeftModel.from_pretrained(nf4(), a.folder).eval() for a in adapters[:2]}}
    for (out, end), (p, n, a) in zip(got, jobs):
        assert end["finish_reason"] == "length" and out == greedy(refs[a.folder if a else None], p, n), (a, p)
