"""The continuous-batching engine on CPU: the same code the GPU runs, eager instead of CUDA graphs."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import reference_dir
from transformers import AutoModelForCausalLM

from serving.engine import Engine, EngineConfig, Overloaded, TooLong
from serving.runners import ChatGLM1Runner, GlmRunner, RowInput, flat_rows, runner_for
from serving.sampling import SamplingParams

PROMPTS = [list(range(5, 23)), [30, 31, 32], list(range(40, 47)), [50] * 40, [60, 61], list(range(70, 100))]
LENGTHS = [12, 7, 20, 9, 15, 5]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def start(model, slots=4, max_len=512, queued=16, chunk=16, step_tokens=None) -> Engine:
    return Engine(runner_for(model, slots, max_len), EngineConfig(slots, max_len, queued, chunk, step_tokens=step_tokens),
                  model.config.vocab_size)


async def collect(engine, prompt, params, stop_ids=(), delay=0.0, abort_after=None):
    await asyncio.sleep(delay)
    req = engine.submit(prompt, params, list(stop_ids))
    out = []
    while True:
        item = await req.queue.get()
        if isinstance(item, dict):
            return out, item["finish_reason"]
        out.append(item)
        if abort_after is not None and len(out) == abort_after:
            engine.abort(req)


def run_all(engine, jobs):
    async def main():
        return await asyncio.gather(*jobs())
    return asyncio.run(main())


def staggered_greedy(engine) -> list:
    """PROMPTS arriving 10 ms apart, each asking for exactly its LENGTHS tokens, greedy."""
    return run_all(engine, lambda: [collect(engine, p, SamplingParams(n, temperature=0, min_tokens=n), delay=0.01 * i)
                                    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))])


def greedy(model, prompt, n, stop_ids=None):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=0 if stop_ids else n,
                         do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_staggered_replies_equal_generate(model) -> None:
    engine = start(model)  # 6 requests, 4 slots: two wait; prompts of 40 tokens take 3 prefill chunks
    assert isinstance(engine.runner, GlmRunner)
    try:
        got = staggered_greedy(engine)
    finally:
        engine.shutdown()
    for (out, finish), p, n in zip(got, PROMPTS, LENGTHS):
        assert out == greedy(model, p, n) and finish == "length"


def test_greedy_replies_equal_generate_with_staggered_arrivals_and_lengths(tiny):
    assert_staggered_replies_equal_generate(tiny)


def _tiny_glm4():
    """GLM-4-0414's layout (Glm4ForCausalLM) at toy size; its norms' weights drawn away from one so that the
    post-attention and post-MLP norms show in every logit."""
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(0)
    model = Glm4ForCausalLM(Glm4Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True, initializer_range=0.25,
        pad_token_id=0, eos_token_id=None, bos_token_id=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def test_glm4_0414_greedy_replies_equal_generate_and_its_step_logits_equal_the_models():
    """Glm4ForCausalLM through the flat-token step (its extra norms folded into the residual adds): staggered
    requests give generate's greedy replies, and a step's logits equal the model's forward over the sequence."""
    model = _tiny_glm4()
    assert_staggered_replies_equal_generate(model)
    runner = runner_for(model, 2, 128)
    seqs = [list(range(5, 30)), [9, 8, 7]]
    logits = runner.forward([RowInput(slot, seq, 0) for slot, seq in enumerate(seqs)])
    for slot, seq in enumerate(seqs):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        torch.testing.assert_close(logits[slot], expected, atol=1e-4, rtol=1e-4)


def test_chatglm1_greedy_replies_equal_generate_with_staggered_arrivals_and_long_prompts():
    """ChatGLM-6B through the flat-token step: bidirectional prompts (longer than a prefill chunk, taken whole),
    2D positions, its own ops; 6 requests on 4 slots, arriving 10 ms apart, each with its own length."""
    model = _wide_tiny_chatglm1()
    prompts = [[5 + (7 * i + j) % 900 for j in range(n)] + [130001, 130004]
               for i, n in enumerate([18, 3, 40, 7, 2, 30])]
    prompts[3] = prompts[3][:-1]  # a prompt without <sop>: causal throughout
    engine = start(model, chunk=16)
    assert isinstance(engine.runner, ChatGLM1Runner)
    try:
        got = run_all(engine, lambda: [collect(engine, p, SamplingParams(n, temperature=0, min_tokens=n),
                                               delay=0.01 * i) for i, (p, n) in enumerate(zip(prompts, LENGTHS))])
    finally:
        engine.shutdown()
    for (out, finish), p, n in zip(got, prompts, LENGTHS):
        assert out == greedy(model, p, n) and finish == "length"


@pytest.mark.parametrize("long_from", [512, 4], ids=["short prompts", "long prompts"])
def test_chatglm1_step_logits_equal_the_models_at_prefill_and_every_decode_step(long_from):
    """Closer than greedy tokens: the logits of the flat step equal the model's own forward over the whole
    sequence, for three prompts side by side (one without <sop>) and then their decode steps; prompts attended
    token by token, or (as prompts longer than `long_from` are) their part before <sop> in one call."""
    model = _wide_tiny_chatglm1()
    runner = runner_for(model, 3, 128)
    runner.PROMPT_KERNEL_MAX = long_from
    seqs = [[5 + j % 700 for j in range(25)] + [130001, 130004], [9, 8, 7, 130001, 130004], list(range(40, 52))]
    logits = runner.forward([RowInput(slot, seq, 0) for slot, seq in enumerate(seqs)])
    for _ in range(4):
        for slot, seq in enumerate(seqs):
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[slot], expected, atol=1e-4, rtol=1e-4)
            seq.append(int(expected.argmax()))
            runner.last_token[slot] = seq[-1]
        logits = runner.forward([RowInput(slot, None, len(seq) - 1) for slot, seq in enumerate(seqs)])


def _wide_tiny_chatglm1():
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM

    torch.manual_seed(0)
    model = ChatGLM1ForCausalLM(ChatGLM1Config(hidden_size=64, num_layers=2, num_attention_heads=4,
                                               inner_hidden_size=128, vocab_size=130528)).eval()
    with torch.no_grad():  # weights wide enough that attention moves the replies (at 0.02 the residual rules)
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(8)
        model.transformer.word_embeddings.weight.mul_(20)  # confident logits: no near-ties for argmax to split
    return model


def test_chatglm1_greedy_replies_equal_generate_on_the_reference_model():
    from common.data import Conversation
    from common.models.loader import load_model, load_tokenizer, open_model_folder
    from common.templates import get_template

    info = open_model_folder(str(reference_dir("chatglm1")))
    model = load_model(info, bits=16, dtype=torch.float32).eval()
    tok, template = load_tokenizer(info), get_template(info.template)
    prompts = [template.prompt(tok, Conversation(history=h, query=q)) for h, q in
               [([], "你好"), ([("你好", "你好！")], "中国的首都是哪里？"), ([], "写一首诗"), ([], "hello")]]
    stops = template.stop_token_ids(tok)
    engine = Engine(runner_for(model, 2, 256), EngineConfig(2, 256, 8), model.config.vocab_size)
    assert isinstance(engine.runner, ChatGLM1Runner)
    try:
        got = run_all(engine, lambda: [collect(engine, p, SamplingParams(10, temperature=0), stops, delay=0.02 * i)
                                       for i, p in enumerate(prompts)])
    finally:
        engine.shutdown()
    for (out, _), p in zip(got, prompts):
        assert out == greedy(model, p, 10, stops)


def test_streamed_text_never_holds_u_fffd_for_bytes_that_form_no_character(tiny, tiny_tokenizer):
    from serving.streaming import REPLACEMENT, Detokenizer

    tok = tiny_tokenizer
    bei, jing = tok.encode("北"), tok.encode("京")  # byte-level tokens: a character is split over several
    crafted = [*bei[:1], *tok.encode("a"), *bei, *jing[1:], *jing]  # a lead byte before ASCII, orphan tail bytes
    assert REPLACEMENT in tok.decode(crafted)
    engine = start(tiny)
    try:  # the random model's own replies hold such bytes too
        made = [out for out, _ in staggered_greedy(engine)]
    finally:
        engine.shutdown()
    replies = [crafted] + [r for r in made if REPLACEMENT in tok.decode(r)]
    assert len(replies) > 1
    for ids in replies:
        for step in (1, 3):  # a token per chunk, and several per chunk (the server's batched chunks)
            detok = Detokenizer(tok)
            text = "".join(detok.add(*ids[k:k + step]) for k in range(0, len(ids), step))
            assert REPLACEMENT not in text
            whole = tok.decode(ids, skip_special_tokens=True)
            assert text == whole.rstrip(REPLACEMENT).replace(REPLACEMENT, "")
    assert Detokenizer(tok).add(*crafted) == "a北京"


def test_a_seed_makes_a_sampled_reply_reproducible_and_temperature_zero_is_greedy(tiny):
    engine = start(tiny)
    sampled = SamplingParams(16, temperature=1.0, top_p=0.9, min_tokens=16, seed=1234)
    try:
        # The seeded request shares the batch with different company each time.
        a = run_all(engine, lambda: [collect(engine, PROMPTS[0], sampled), collect(engine, PROMPTS[1], SamplingParams(
            30, temperature=1.0, min_tokens=30))])[0][0]
        b = run_all(engine, lambda: [collect(engine, PROMPTS[2], SamplingParams(8, temperature=0.7, min_tokens=8)),
                                     collect(engine, PROMPTS[0], sampled, delay=0.01)])[1][0]
        other = run_all(engine, lambda: [collect(engine, PROMPTS[0], SamplingParams(
            16, temperature=1.0, top_p=0.9, min_tokens=16, seed=99))])[0][0]
        zero = run_all(engine, lambda: [collect(engine, PROMPTS[0], SamplingParams(16, temperature=0, min_tokens=16))])
    finally:
        engine.shutdown()
    assert a == b and a != other
    assert zero[0][0] == greedy(tiny, PROMPTS[0], 16)


def test_stop_ids_end_a_reply_but_not_before_min_tokens(tiny):
    ref = greedy(tiny, PROMPTS[0], 12)
    stop = ref[3]
    expected_stop = ref[: ref.index(stop)]
    engine = start(tiny)
    try:
        (early, why), (late, why_late) = run_all(engine, lambda: [
            collect(engine, PROMPTS[0], SamplingParams(12, temperature=0), [stop]),
            collect(engine, PROMPTS[0], SamplingParams(12, temperature=0, min_tokens=12), [stop])])
    finally:
        engine.shutdown()
    assert (early, why) == (expected_stop, "stop")
    assert len(late) == 12 and why_late == "length"


def test_suppress_first_bans_tokens_at_the_first_step_only_on_both_paths(tiny, tiny_tokenizer):
    """tool_choice "required" bans the token that starts plain text; the engine and the per-request path alike."""
    from serving.streaming import stream_reply

    logits = tiny(torch.tensor([PROMPTS[0]])).logits[0, -1]
    first, runner_up = logits.topk(2).indices.tolist()
    banned = SamplingParams(6, temperature=0, min_tokens=6, suppress_first=(first,))
    expected = greedy(tiny, PROMPTS[0] + [runner_up], 5)
    engine = start(tiny)
    try:
        [(out, _)] = run_all(engine, lambda: [collect(engine, PROMPTS[0], banned)])
    finally:
        engine.shutdown()
    assert out == [runner_up] + expected

    async def per_request():
        return [c async for c in stream_reply(tiny, tiny_tokenizer, PROMPTS[0], [], banned)]

    chunks = asyncio.run(per_request())
    text = "".join(c.get("delta", "") for c in chunks)
    assert text == tiny_tokenizer.decode([runner_up] + expected).replace("\ufffd", "")  # stray bytes are dropped
    assert chunks[-1]["completion_tokens"] == 6


def test_limits_are_enforced_at_submit_and_a_cancelled_request_frees_its_slot(tiny):
    engine = start(tiny, slots=2, max_len=64, queued=1)

    async def scenario():
        with pytest.raises(TooLong, match="max_model_len of 64"):
            engine.submit(list(range(60)), SamplingParams(10), [])
        long = SamplingParams(50, temperature=0, min_tokens=50)
        reqs = [engine.submit([1, 2, 3], long, []) for _ in range(3)]  # 2 running + 1 waiting
        with pytest.raises(Overloaded) as err:
            engine.submit([1, 2, 3], long, [])
        assert err.value.retry_after >= 1
        for r in reqs:
            engine.abort(r)
        ends = [await _last(r) for r in reqs]
        return ends

    try:
        ends = asyncio.run(scenario())
        assert all(e["finish_reason"] in ("cancelled", "length") for e in ends)
        stats = engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["free_slots"] == 2
    finally:
        engine.shutdown()


async def _last(req):
    while True:
        item = await req.queue.get()
        if isinstance(item, dict):
            return item


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["glm", "glm4-0414"])
@pytest.mark.parametrize("gemv", ["as measured", "every projection"])
def test_cuda_graph_decode_steps_give_the_greedy_replies_of_generate_on_gpu(tiny_model, arch, gemv):
    model = (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32) if arch == "glm"
             else _tiny_glm4()).cuda().eval()
    runner = runner_for(model, 8, 512)
    assert runner.ops.name == "triton", runner.ops_note
    if gemv == "every projection":  # steps of <= 4 rows through the Triton GEMV whatever the start-up timing chose
        runner.proj.fast = set(runner.proj.weights)
    assert runner.capture(8, 512) > 0
    engine = Engine(runner, EngineConfig(8, 512, 16, 16), model.config.vocab_size)
    try:
        got = staggered_greedy(engine)
    finally:
        engine.shutdown()
    for (out, _), p, n in zip(got, PROMPTS, LENGTHS):
        ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist()
        assert out == ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_chatglm1_on_gpu_triton_ops_and_cuda_graphs_give_the_models_logits():
    """On a GPU: the Triton ops pass their start-up check, decode steps replay captured graphs, and the logits at
    prefill and each decode step stay those of the model's own forward (fp32): short prompts (attended by the
    decode kernel) and a step with a long one (one SDPA per prompt), one of them without <sop>."""
    model = _wide_tiny_chatglm1().cuda()
    runner = runner_for(model, 4, 1024)
    assert runner.ops.name == "triton", runner.ops_note
    assert runner.capture(4, 1024) > 0
    for longest in (200, 700):
        seqs = [[5 + j % 700 for j in range(n)] + [130001, 130004] for n in (longest, 11, 20)]
        seqs[1] = seqs[1][:-1]  # no <sop>: causal throughout
        logits = runner.forward([RowInput(i, s, 0) for i, s in enumerate(seqs)])
        for _ in range(5):
            for slot, seq in enumerate(seqs):
                with torch.no_grad():
                    expected = model(input_ids=torch.tensor([seq], device="cuda"), use_cache=False).logits[0, -1]
                torch.testing.assert_close(logits[slot], expected, atol=2e-3, rtol=1e-3)
                seq.append(int(expected.argmax()))
                runner.last_token[slot] = seq[-1]
            logits = runner.forward([RowInput(slot, None, len(seq) - 1) for slot, seq in enumerate(seqs)])
    assert runner.graphs


def test_the_engine_in_its_own_process_gives_the_same_greedy_replies(tiny_model, tiny):
    from serving.engine_process import EngineProcess, EngineSpec

    engine = EngineProcess(EngineSpec(str(tiny_model), 16, "fp32", "cpu", max_num_seqs=4, max_model_len=512,
                                      max_queued_requests=2, prefill_chunk=16, threads=1))
    try:
        assert engine.max_model_len == 512 and "max_num_seqs 4" in engine.info["line"]
        got = staggered_greedy(engine)

        async def over_the_limit():
            reqs = [engine.submit([1, 2], SamplingParams(100, temperature=0, min_tokens=100), []) for _ in range(6)]
            with pytest.raises(Overloaded):
                engine.submit([1, 2], SamplingParams(4), [])
            with pytest.raises(TooLong):
                engine.submit(list(range(500)), SamplingParams(20), [])
            for r in reqs:
                engine.abort(r)
            return [await _last(r) for r in reqs], await engine.query()

        ends, state = asyncio.run(over_the_limit())
    finally:
        engine.shutdown()
    for (out, _), p, n in zip(got, PROMPTS, LENGTHS):
        assert out == greedy(tiny, p, n)
    assert all(e["finish_reason"] in ("cancelled", "length") for e in ends)
    assert state["stats"]["running"] == 0 and "glmops_requests_cancelled_total" in state["metrics"]


def _conversations(engine, order: str) -> dict[str, list[list[int]]]:
    """Conversations taking turns in `order` (one request at a time), each resending its whole history: turn k's
    prompt is turn k - 1's prompt, its greedy reply and 20 new tokens. Returns each conversation's replies."""
    async def main():
        prompts = {c: [100 + i] + list(range(200 + 7 * i, 240 + 7 * i)) for i, c in enumerate(sorted(set(order)))}
        replies: dict[str, list[list[int]]] = {c: [] for c in prompts}
        for c in order:
            out, _ = await collect(engine, prompts[c], SamplingParams(12, temperature=0, min_tokens=12))
            replies[c].append(out)
            t = len(replies[c])
            prompts[c] = prompts[c] + out + list(range(300 + 20 * t, 320 + 20 * t))
        return replies

    return asyncio.run(main())


def test_kv_kept_between_turns_gives_the_replies_of_a_full_prefill_even_when_evicted(tiny):
    """Three conversations on 2 slots, turn after turn: A's second turn starts from what its first left in a slot;
    C's first turn needs a slot and overwrites A's (the least recently used), so A's third turn prefills all of
    it again; C's second turn reuses C's. The replies are those of a full prefill every time."""
    order = "AABCACB"

    def replies(reuse: bool):
        engine = Engine(runner_for(tiny, 2, 512), EngineConfig(2, 512, 16, 16, prefix_cache=reuse),
                        tiny.config.vocab_size)
        try:
            got = _conversations(engine, order)
            m = engine.metrics
            return got, [c._value.get() for c in (m.prefix_hits, m.prefix_tokens_saved, m.prefix_evictions, m.prefilled)]
        finally:
            engine.shutdown()

    plain, (hits0, _, _, prefilled_plain) = replies(False)
    reused, (hits, saved, evictions, prefilled) = replies(True)
    assert reused == plain and hits0 == 0
    assert hits == 2 and evictions >= 2 and saved >= 2 * 52, (hits, saved, evictions)
    assert prefilled == prefilled_plain - saved  # what was reused was not prefilled again
    assert plain["A"][0] == greedy(tiny, [100] + list(range(200, 240)), 12)


def test_under_a_burst_far_beyond_its_slots_running_streams_get_a_token_every_step(tiny):
    """Two long replies are running when 40 requests with 40-token prompts arrive at once (4 slots): every step
    until the long replies end decodes both of them, in the same forward as the newcomers' prompt chunks, and
    no step holds more than `step_tokens` tokens while streams decode (`prefill_chunk` only while nothing does).
    Time to first token grows for the newcomers, not the running streams' time per token."""
    engine = start(tiny, slots=4, queued=64, chunk=16, step_tokens=12)
    steps: list[tuple[set[int], int, int]] = []  # per step: the requests it sampled, its prompt tokens, decode rows
    forwards: list[int] = []  # tokens of each forward the runner ran
    launch, forward = engine._launch, engine.runner.forward

    def recorded():
        step = launch()
        if step is not None:
            steps.append(({r.id for r in step.requests}, step.prefilled, step.decoded))
        return step

    def counted(rows):
        forwards.append(sum(r.size for r in rows))
        return forward(rows)

    engine._launch, engine.runner.forward = recorded, counted  # the engine thread looks them up every step

    async def scenario():
        long = [engine.submit([5 + i, 6, 7], SamplingParams(60, temperature=0, min_tokens=60), []) for i in range(2)]
        for _ in range(3):
            await long[0].queue.get()
        burst = [collect(engine, list(range(100 + i, 140 + i)), SamplingParams(4, temperature=0, min_tokens=4))
                 for i in range(40)]
        done = await asyncio.gather(*burst)
        for req in long:
            while not isinstance(await req.queue.get(), dict):
                pass
        return [r.id for r in long], done

    try:
        long_ids, done = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert all(len(out) == 4 for out, _ in done)
    for rid in long_ids:
        life = [i for i, (sampled, _, _) in enumerate(steps) if rid in sampled]
        window = steps[life[0]:life[-1] + 1]
        assert len(life) == 60 and len(window) == 60  # a token in every step of its life, none skipped
        assert sum(1 for _, prefilled, _ in window if prefilled) >= 20  # the burst was prefilled meanwhile
    assert len(forwards) == len(steps)  # one forward a step: prompt chunks and decode rows together
    assert all(prefilled + decoded <= 12 for _, prefilled, decoded in steps if decoded)
    assert any(prefilled + decoded == 12 for _, prefilled, decoded in steps if decoded)  # the budget is used
    assert max(prefilled for _, prefilled, decoded in steps if not decoded) == 16  # nothing decodes: prefill_chunk


def test_a_step_gives_prompts_what_its_decode_rows_leave_of_step_tokens_and_never_less_than_a_quarter():
    config = EngineConfig(128, 4096, 16, prefill_chunk=2048, step_tokens=512)
    assert config.prompt_budget(0) == 2048    # nothing decodes: a whole chunk
    assert config.prompt_budget(100) == 412
    assert config.prompt_budget(500) == 128   # a full batch still lets prompts in
    assert EngineConfig(128, 4096, 16, prefill_chunk=256, step_tokens=512).prompt_budget(8) == 256
    assert EngineConfig(128, 4096, 16, prefill_chunk=2048).prompt_budget(100) == 2048  # no step budget


def test_a_mixed_step_flattens_to_each_rows_tokens_slot_positions_and_adapter_with_its_last_index():
    rows = [RowInput(3, None, 40), RowInput(0, [7, 8, 9], 5, lora=2), RowInput(5, None, 2), RowInput(1, [4], 0)]
    flat, last = flat_rows(rows)
    assert flat.tolist() == [[0, 7, 8, 9, 0, 4],        # a decode row's token is filled in on the device
                             [3, 0, 0, 0, 5, 1],        # slot
                             [40, 5, 6, 7, 2, 0],       # position
                             [-1, 2, 2, 2, -1, -1]]     # adapter slot
    assert last.tolist() == [0, 3, 4, 5]


def test_decode_gemv_is_auto_or_off_and_anything_else_stops_the_app_before_it_starts():
    from serving import AppArgs, app

    assert AppArgs().decode_gemv == "auto"
    with pytest.raises(ValueError, match="decode_gemv must be 'auto' or 'off', not 'fast'"):
        app(AppArgs(decode_gemv="fast"))
