"""GLM-4's tokenizer (glm-4-9b-chat's `tokenizer.model`), written on tiktoken, without THUDM's remote code.

The file holds byte-level BPE ranks, one `base64(token) rank` per line; the ids are the ranks, then 14 special
tokens after them in a fixed order ([gMASK] = n + 2, <sop> = n + 4, <|user|> = n + 7 ...). Text is split
by GLM-4's pre-tokenizing expression and merged by rank, as THUDM's `ChatGLM4Tokenizer` does; special
strings inside text are plain text (as its `build_single_message` encodes messages). `encode` prepends
`[gMASK]<sop>`; padding is on the left. Registered with `AutoTokenizer` under THUDM's class name.
"""

from __future__ import annotations

import base64
import os
import shutil
from typing import Any

from transformers import PreTrainedTokenizer

from common.errors import ModelFilesError
from common.models.tokenization_chatglm import ChatGLMTokenizer

# GLM-4's pre-tokenizer: contractions, letters with one leading non-letter, numbers in threes, punctuation runs,
# newlines, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>"]


def read_ranks(path: str) -> dict[bytes, int]:
    """The BPE ranks of a GLM-4 `tokenizer.model`; a clear message for a file of another kind."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, IndexError):
                raise ModelFilesError(
                    f"{path}: line {n} is not 'base64-token rank'. GLM-4's tokenizer.model is a text file of BPE "
                    "ranks (ChatGLM2/3's is a sentencepiece model: is this folder's family right?)") from None
            ranks[token] = rank
    return ranks


def write_ranks(ranks: dict[bytes, int], path: str) -> None:
    """A `tokenizer.model` in GLM-4's format (tests and the tiny model write their own vocabularies)."""
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    """glm-4-9b-chat's tokenizer: tiktoken BPE over `tokenizer.model`, GLM-4's 14 special tokens after it."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, padding_side: str = "left", clean_up_tokenization_spaces: bool = False,
                 **kwargs: Any):
        import tiktoken

        self.vocab_file = vocab_file
        self.ranks = read_ranks(vocab_file)
        n = len(self.ranks)
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIALS)}
        self.special_by_id = {i: tok for tok, i in self.special_ids.items()}
        self.bpe = tiktoken.Encoding(name="glm4", pat_str=SPLIT_PATTERN, mergeable_ranks=self.ranks,
                                     special_tokens=self.special_ids)
        self.by_id = {i: t for t, i in self.ranks.items()}
        for k in ("eos_token", "unk_token", "pad_token", "bos_token"):
            kwargs.pop(k, None)
        super().__init__(padding_side=padding_side, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        # BPE tokens are bytes; as strings they are shown as latin-1 (one character per byte, never colliding).
        vocab = {t.decode("latin-1"): i for t, i in self.ranks.items()}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        return self.special_ids[token]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.by_id[i].decode("latin-1") for i in self.bpe.encode(text, disallowed_special=())]

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._tokenize(text)  # no added-token splitting: "<|user|>" in text is text

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.ranks.get(token.encode("latin-1"), -1) if all(ord(c) < 256 for c in token) else -1

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_by_id:
            return self.special_by_id[index]
        return self.by_id[index].decode("latin-1") if index in self.by_id else ""

    def convert_tokens_to_ids(self, tokens):  # type: ignore[override]
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs):  # type: ignore[override]
        if kwargs or text_pair is not None or not isinstance(text, str):
            return super().encode(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)
        ids = self.bpe.encode(text, disallowed_special=())
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._text([self._convert_token_to_id(t) for t in tokens], skip_special_tokens=False)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs: Any) -> str:
        return self._text([token_ids] if isinstance(token_ids, int) else token_ids, skip_special_tokens)

    def _text(self, ids, skip_special_tokens: bool) -> str:
        """Bytes of the BPE tokens decoded together (a character may span tokens); special tokens written
        literally, except <|endoftext|> when skipping special tokens (THUDM's decode registers only it)."""
        out, pending = [], b""
        for i in (int(i) for i in ids):
            if i in self.by_id:
                pending += self.by_id[i]
                continue
            if i in self.special_by_id and not (skip_special_tokens and i == self.special_ids["<|endoftext|>"]):
                out.append(pending.decode("utf-8", errors="replace") + self.special_by_id[i])
                pending = b""
        return "".join(out) + pending.decode("utf-8", errors="replace")

    # -- model inputs ----------------------------------------------------------------------------
    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.special_ids["<|endoftext|>"]]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    _pad = ChatGLMTokenizer._pad  # left padding with position ids, as ChatGLM2/3's

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
