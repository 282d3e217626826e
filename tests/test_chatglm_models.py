"""Our ChatGLM loading computes exactly what THUDM's original code computes (../shared/reference).

ChatGLM2/3 run as transformers' native GlmForCausalLM after weight mapping; ChatGLM-6B runs as our own
ChatGLM1ForCausalLM. Float32, tolerance 1e-4 (the reference README's suggestion); greedy tokens exact.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import reference_cases, reference_dir

from common.models.loader import detect, load_model, load_tokenizer

ATOL = 1e-4
PAD = {"chatglm1": 3, "chatglm2": 0, "chatglm3": 0}


@pytest.fixture(scope="module", params=["chatglm1", "chatglm2", "chatglm3"])
def loaded(request, tmp_path_factory):
    version = request.param
    src = reference_dir(version)
    if version == "chatglm3":  # the reference shares ChatGLM2's tiny weights
        src = tmp_path_factory.mktemp("ref") / "chatglm3"
        shutil.copytree(reference_dir("chatglm3"), src)
        shutil.copy(reference_dir("chatglm2") / "model.safetensors", src)
    from safetensors.torch import load_file

    info = detect(src)
    model = load_model(info, dtype=torch.float32).eval()
    return version, info, model, load_file(str(reference_dir(version) / "hidden_states.safetensors"))


def _batch_inputs(version, ref):
    ids = ref["batch.input_ids"]
    mask = (ids != PAD[version]).long()
    if version == "chatglm1":  # the model derives its 2D positions and prefix mask itself
        return ids, mask, {}
    return ids, mask, {"position_ids": ref["batch.position_ids"]}


def test_family_is_detected_from_the_folder(loaded):
    version, info, _, _ = loaded
    assert info.layout == "thudm"
    assert info.family == {"chatglm1": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3"}[version]


def _run(model, **inputs):
    """(embeddings, [output of each layer], final hidden state after the final norm, logits)."""
    layers = model.transformer.layers if hasattr(model, "transformer") else model.model.layers
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out.hidden_states[0], outs, out.hidden_states[-1], out.logits


def test_padded_batch_hidden_states_per_layer_and_logits_match(loaded):
    version, _, model, ref = loaded
    ids, mask, kw = _batch_inputs(version, ref)
    emb, layers, final, logits = _run(model, input_ids=ids, attention_mask=mask, **kw)
    real = mask.bool()
    expected = ref["batch.all_hidden_states"]
    assert (emb - expected[0])[real].abs().max() <= ATOL
    assert (layers[0] - expected[1])[real].abs().max() <= ATOL
    if version != "chatglm1":  # v2/v3 reference the last layer's output before the final norm
        assert (layers[-1] - expected[2])[real].abs().max() <= ATOL
    assert (final - ref["batch.hidden_states"])[real].abs().max() <= ATOL
    assert (logits[:, -1] - ref["batch.last_logits"]).abs().max() <= ATOL


def test_each_prompt_alone_matches(loaded):
    _, _, model, ref = loaded
    for i in range(3):
        _, _, final, _ = _run(model, input_ids=ref[f"single{i}.input_ids"])
        assert (final - ref[f"single{i}.hidden_states"]).abs().max() <= ATOL


def test_greedy_generation_is_token_identical_batched_and_single(loaded):
    version, _, model, ref = loaded
    cases = reference_cases(version)["model_forward"]
    ids, mask, _ = _batch_inputs(version, ref)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert out[:, ids.shape[1]:].tolist() == cases["batch"]["greedy_new_tokens"]
    for single in cases["singles"]:
        x = torch.tensor([single["input_ids"]])
        out = model.generate(x, max_new_tokens=10, do_sample=False)
        assert out[0, x.shape[1]:].tolist() == single["greedy_new_tokens"]


def test_chat_reply_matches_the_original_chat(loaded):
    version, info, model, _ = loaded
    from common.data import Conversation
    from common.templates import get_template

    chat = reference_cases(version)["model_forward"]["chat"]
    tok = load_tokenizer(info)
    template = get_template(info.template)
    history = chat["history_in"]
    if version == "chatglm3":
        history = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history), 2)]
    ids = template.prompt(tok, Conversation(history=[tuple(h) for h in history], query=chat["query"]))
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    new = out[0, len(ids):].tolist()
    if version == "chatglm3":  # ChatGLM3's chat() drops the final generated token before decoding
        new = new[:-1]
    reply = template.clean_reply(tok.decode(new))
    expected = chat["response"]
    assert reply.strip() == expected.strip()
