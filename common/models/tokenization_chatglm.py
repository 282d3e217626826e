"""Tokenizers for ChatGLM-6B (v1) and ChatGLM2/3-6B, written on sentencepiece.

THUDM ships these as repo "remote code" that current transformers releases break. These classes
reproduce the original ids and decoding (tests/test_tokenizers.py checks every reference case)
and register with `AutoTokenizer` under the original class name `ChatGLMTokenizer`, so a THUDM
folder loads without `trust_remote_code`.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

# ChatGLM2/3: specials live after the sentencepiece vocabulary, in this order.
V2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
V3_ROLE_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

V1_MAX_BLANK = 80  # runs of 2..80 spaces are single <|blank_n|> pieces


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM2-6B / ChatGLM3-6B tokenizer (`tokenizer.model`).

    `encode` prepends `[gMASK] sop`; padding is on the left; special strings in text are plain text
    (the original does not split them out). ChatGLM3 adds four role tokens; which one this is follows
    from `chat_roles` (saved in tokenizer_config.json; THUDM folders are told apart by name).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, padding_side: str = "left", chat_roles: bool | None = None,
                 clean_up_tokenization_spaces: bool = False, **kwargs: Any):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        if chat_roles is None:
            name = str(kwargs.get("name_or_path", ""))
            chat_roles = "chatglm3" in name.lower()
        self.chat_roles = bool(chat_roles)
        n = self.sp.vocab_size()
        names = V2_SPECIALS + (V3_ROLE_SPECIALS if self.chat_roles else [])
        self.special_ids = {tok: n + i for i, tok in enumerate(names)}
        self.special_by_id = {i: tok for tok, i in self.special_ids.items()}
        for k in ("eos_token", "unk_token", "pad_token", "bos_token"):
            kwargs.pop(k, None)
        super().__init__(padding_side=padding_side, eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, chat_roles=self.chat_roles,
                         **kwargs)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(self.special_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a special token by name ([gMASK], sop, <|user|>, ...)."""
        if token in self.special_ids:
            return self.special_ids[token]
        return {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()}[token]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # No added-token splitting: the original treats "[gMASK]" or "<|user|>" in text as plain text.
        return self._tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_by_id:
            return self.special_by_id[index]
        if 0 <= index < self.sp.vocab_size():
            return self.sp.id_to_piece(index)
        return ""

    def convert_tokens_to_ids(self, tokens):  # type: ignore[override]
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs):  # type: ignore[override]
        if kwargs or text_pair is not None or not isinstance(text, str):
            return super().encode(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)
        ids = self._encode_text(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces([t for t in tokens if t])

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        plain = {self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()}
        pieces = []
        for i in token_ids:
            i = int(i)
            if i in plain or i < 0:
                continue
            if i in self.special_by_id:
                # v2 drops its specials in decode; v3 writes them literally, even when asked to skip
                # special tokens (as the originals do).
                if self.chat_roles:
                    pieces.append(self.special_by_id[i])
                continue
            if i < self.sp.vocab_size():
                pieces.append(self.sp.id_to_piece(i))
        return self.sp.decode_pieces(pieces)

    # -- model inputs ----------------------------------------------------------------------------
    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.sp.eos_id()]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None):
        from transformers.utils import PaddingStrategy

        ids = encoded_inputs["input_ids"]
        n = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST or max_length is None:
            max_length = max_length or n
        if pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * n
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(n))
        pad = max_length - n if padding_strategy != PaddingStrategy.DO_NOT_PAD else 0
        if pad > 0:
            side = padding_side or self.padding_side
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "position_ids": 0}
            for key, value in fill.items():
                if key in encoded_inputs:
                    if side == "left":
                        encoded_inputs[key] = [value] * pad + list(encoded_inputs[key])
                    else:
                        encoded_inputs[key] = list(encoded_inputs[key]) + [value] * pad
        return encoded_inputs

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


class ChatGLM1Tokenizer(PreTrainedTokenizer):
    """ChatGLM-6B tokenizer (`ice_text.model`).

    Before sentencepiece: newlines become `<n>`, tabs `<|tab|>`, runs of 2..80 spaces `<|blank_n|>`.
    `encode` APPENDS `[gMASK] <sop>`; the answer ends with `<eop>`.
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids"]

    def __init__(self, vocab_file: str, padding_side: str = "left", clean_up_tokenization_spaces: bool = True,
                 **kwargs: Any):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
            kwargs.pop(k, None)
        for k in ("gmask_token", "end_token", "num_image_tokens", "remove_space", "do_lower_case"):
            kwargs.pop(k, None)
        super().__init__(padding_side=padding_side, bos_token="<sop>", eos_token="<eop>", unk_token="<unk>",
                         pad_token="<pad>", mask_token="[MASK]",
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}

    def get_command(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    @staticmethod
    def _preprocess(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(V1_MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    @staticmethod
    def _postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    # The original runs on transformers 4.27, whose slow tokenizer first splits the registered special tokens
    # (bos <sop>, eos <eop>, unk <unk>, pad <pad>, mask [MASK]) out of the text, strips the whitespace next to
    # each (newlines too) and encodes every piece in between on its own. `[gMASK]` and `</s>` are not
    # registered there (they are extra attributes), so like `<s>` they stay text.
    _SPLIT = re.compile(r"(<sop>|<eop>|<unk>|<pad>|\[MASK\])")

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(self._preprocess(text), out_type=str)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        parts = self._SPLIT.split(text)  # text, special, text, special, ..., text
        for k in range(1, len(parts), 2):
            parts[k - 1], parts[k + 1] = parts[k - 1].rstrip(), parts[k + 1].lstrip()
        out: list[str] = []
        for k, part in enumerate(parts):
            if k % 2:
                out.append(part)
            elif part:
                out.extend(self._tokenize(part))
        return out

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_ids(self, tokens):  # type: ignore[override]
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs):  # type: ignore[override]
        if kwargs or text_pair is not None or not isinstance(text, str):
            return super().encode(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._postprocess(self.sp.decode_pieces(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids if int(i) != self.pad_token_id]
        return self._postprocess(self.sp.decode_ids(ids))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [self.get_command("[gMASK]"), self.get_command("<sop>")]
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.get_command("<eop>")]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "ice_text.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
