"""Our ChatGLM tokenizers reproduce THUDM's originals on every reference case."""

from __future__ import annotations

import pytest
from conftest import reference_cases, reference_tokenizer

VERSIONS = ["chatglm1", "chatglm2", "chatglm3"]


@pytest.mark.parametrize("version", VERSIONS)
def test_tokenize_encode_decode_match_every_reference_case(version):
    tok = reference_tokenizer(version)
    cases = reference_cases(version)["tokenize"]
    assert len(cases) >= 16
    for case in cases:
        text = case["text"]
        assert tok.tokenize(text) == case["tokens"], case["id"]
        assert tok.encode(text, add_special_tokens=False) == case["ids_no_special"], case["id"]
        assert tok.encode(text) == case["ids_with_special"], case["id"]
        assert tok.decode(case["ids_no_special"]) == case["decode_no_special"], case["id"]
        assert tok.decode(case["ids_with_special"]) == case["decode_with_special"], case["id"]
        assert (tok.decode(case["ids_with_special"], skip_special_tokens=True)
                == case["decode_with_special_skip_special_tokens"]), case["id"]


@pytest.mark.parametrize("version", VERSIONS)
def test_vocabulary_size_and_special_ids(version):
    tok = reference_tokenizer(version)
    info = reference_cases(version)["tokenizer_info"]
    assert tok.vocab_size == info["vocab_size"]
    assert tok.eos_token_id == info["eos_token_id"]
    assert tok.pad_token_id == info["pad_token_id"]
    for name, tid in info.get("special_tokens", {}).items():
        assert tok.convert_tokens_to_ids(name) == tid


@pytest.mark.parametrize("version", ["chatglm2", "chatglm3"])
def test_left_padding_masks_and_positions_as_the_original(version):
    tok = reference_tokenizer(version)
    cases = reference_cases(version)
    batch = cases["model_forward"]["batch"]
    ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    padded = tok.pad({"input_ids": ids}, padding=True)
    assert padded["input_ids"] == batch["input_ids"]
    assert padded["attention_mask"] == batch["attention_mask"]
    assert padded["position_ids"] == batch["position_ids"]


# ChatGLM-6B's original tokenizer runs on transformers 4.27 (what THUDM's code pins). Its slow-tokenizer base
# splits the registered special tokens (<sop>, <eop>, <unk>, <pad>, [MASK]) out of the text, strips the
# whitespace beside each, and encodes the pieces between them separately; `<n>` is an ordinary piece of the
# vocabulary (the newline's), and `</s>`, `<s>`, `[gMASK]` stay text. The ids below are what that 4.27 base
# class gives over the shared ice_text.model (checked in a scratch environment with transformers==4.27.1).
SPECIAL_STRINGS = [
    ("a<n>b", [104, 4, 178]),
    ("a<unk>b", [104, 0, 463]),
    ("a <pad> b", [104, 3, 463]),
    ("a</s>b", [104, 67, 106, 33, 178]),
    ("a <s> b", [104, 46, 106, 33, 463]),
    ("问<sop>\n答", [5, 64286, 130004, 68188]),
    ("x [MASK] y", [399, 130000, 548]),
    ("[gMASK]z", [53, 199, 15475, 42, 292]),
    ("<eop>", [130005]),
    ("a\n<unk>\nb", [104, 0, 463]),
]


@pytest.mark.parametrize("text,ids", SPECIAL_STRINGS)
def test_chatglm1_special_token_strings_inside_text_encode_as_the_original(text, ids):
    tok = reference_tokenizer("chatglm1")
    assert tok.encode(text, add_special_tokens=False) == ids
