"""Chat templates: a conversation becomes `input_ids` and `labels`, the same way for training and serving.

One template per family:
  chatglm   ChatGLM-6B:   bare first query, then "[Round i]\\n问：…\\n答：…\\n" (0-based); ids + [gMASK] <sop>
  chatglm2  ChatGLM2-6B:  [gMASK] sop "[Round i]\\n\\n问：…\\n\\n答：…\\n\\n" (1-based)
  chatglm3  ChatGLM3-6B:  [gMASK] sop <|system|>/<|user|>/<|assistant|> role tokens, each + "\\n" + content
  glm4      GLM-4:        as chatglm3, with GLM-4's special tokens
  hf        any other model: the tokenizer's own Jinja chat template

Labels are -100 everywhere except on supervised answer tokens, following each family's own
fine-tuning script (checked against ../shared/reference/*/cases.json). By default only the last
answer is learned, as in the seed; `train_on_history=True` learns every answer.

Truncation (exact): the answer keeps at most `max_target_length` tokens (a cut answer loses its end
token, so the model is not taught to stop mid-thought); the prompt must fit `max_source_length`: the
oldest history rounds are dropped one by one until it does. If the current question alone does not fit,
the example is rejected with `ExampleTooLong` (counted and reported, never silently shortened).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.data import Conversation
from common.errors import UserError
from common.tools import ToolCall, tool_format

IGNORE = -100
TEMPLATES = ("chatglm", "chatglm2", "chatglm3", "glm4", "hf")


class TemplateMismatch(UserError):
    """The tokenizer lacks a token the chosen template needs."""


class ExampleTooLong(ValueError):
    """The current question alone exceeds the prompt budget."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    dropped_rounds: int = 0
    answer_truncated: bool = False
    meta: dict = field(default_factory=dict)


def _enc(tok, text: str) -> list[int]:
    if not text:
        return []
    # Fast tokenizers: straight to the Rust backend (the Python wrapper costs ~15 % per call, and data
    # pipelines make millions of calls); the ids are the same.
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tok.encode(text, add_special_tokens=False)


def _id(tok, token: str) -> int:
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or tid < 0 or (tid == tok.unk_token_id and token != tok.unk_token):
        raise TemplateMismatch(f"the tokenizer has no token {token!r}, which chat template needs; pass the "
                               "model's own template with --template, or check glmops.json in the model folder.")
    return tid


class Template:
    """Turns conversations into ids. Subclasses build pieces; this class handles labels and truncation."""

    name = "base"

    # -- what subclasses provide ---------------------------------------------------------------------
    def prompt_pieces(self, tok, conv: Conversation, history: list[tuple[str, str]],
                      history_labels: bool = True) -> list[tuple[list[int], list[int]]]:
        """(ids, answer-label ids or []) pieces of everything before the current answer.

        A piece with a non-empty second element is a history answer; its labels are used only with
        train_on_history (`history_labels=False` may skip computing them: they cost extra encodes)."""
        raise NotImplementedError

    def answer_ids(self, tok, conv: Conversation) -> tuple[list[int], list[int]]:
        """(ids, end ids) of the current answer `conv.answer`: its text and what closes it."""
        raise NotImplementedError

    def answer_tokens(self, tok, conv: Conversation) -> tuple[list[int], list[int], int]:
        """(ids, labels, body) of the current answer: `body` tokens before what closes it. Plain text answers are
        learned whole; templates with tool steps override this (a tool's result inside an answer is not learned)."""
        text_ids, end_ids = self.answer_ids(tok, conv)
        ids = text_ids + end_ids
        return ids, list(ids), len(text_ids)

    supports_tools = False

    def _check_tools(self, conv: Conversation) -> None:
        if conv.uses_tools and not self.supports_tools:
            raise TemplateMismatch(f"template {self.name!r} has no tool-call format; conversations with tools, "
                                   "tool calls or tool results need the chatglm3 or glm4 template (--template).")

    def stop_token_ids(self, tok) -> list[int]:
        raise NotImplementedError

    def clean_reply(self, text: str) -> str:
        """What a reply looks like to a user (e.g. drop ChatGLM3's metadata line)."""
        return text

    # -- shared logic --------------------------------------------------------------------------------
    def encode(self, tok, conv: Conversation, max_source_length: int = 512, max_target_length: int = 512,
               train_on_history: bool = False) -> Encoded:
        """ids + labels for a conversation whose last turn has an answer."""
        if conv.answer is None:
            raise ValueError("encode() needs a conversation with an answer; use prompt() for generation")
        self._check_tools(conv)
        answer, answer_labels, body = self.answer_tokens(tok, conv)
        truncated = False
        if len(answer) > max_target_length:
            keep = min(max_target_length, body)
            answer, answer_labels, truncated = answer[:keep], answer_labels[:keep], True
        pieces, dropped = self._fit_prompt(tok, conv, max_source_length, history_labels=train_on_history)
        ids: list[int] = []
        labels: list[int] = []
        for piece_ids, piece_labels in pieces:
            ids += piece_ids
            labels += piece_labels if (train_on_history and piece_labels) else [IGNORE] * len(piece_ids)
        ids += answer
        labels += answer_labels
        return Encoded(ids, labels, dropped_rounds=dropped, answer_truncated=truncated,
                       meta={"answer_start": len(ids) - len(answer)})

    def prompt(self, tok, conv: Conversation, max_source_length: int | None = None) -> list[int]:
        """ids to generate the next answer from (the server's path); oldest history dropped to fit."""
        self._check_tools(conv)
        pieces, _ = self._fit_prompt(tok, conv, max_source_length, history_labels=False)
        return [i for piece_ids, _ in pieces for i in piece_ids]

    def _fit_prompt(self, tok, conv: Conversation, budget: int | None, history_labels: bool = True):
        history = list(conv.history)
        for dropped in range(len(history) + 1):
            pieces = self.prompt_pieces(tok, conv, history[dropped:], history_labels)
            if budget is None or sum(len(p) for p, _ in pieces) <= budget:
                return pieces, dropped
        n = sum(len(p) for p, _ in pieces)
        raise ExampleTooLong(f"the question alone is {n} tokens, over the prompt budget of {budget}")


def _labels_in_text(tok, prefix: str, span: str) -> tuple[int, int]:
    """Token range of `span` inside encode(prefix + span + ...): for answers inside one prompt string.

    The prompt is tokenized in one piece (as the original does), so an answer's tokens are found by
    encoding the text up to its start and up to its end."""
    a = len(_enc(tok, prefix))
    b = len(_enc(tok, prefix + span))
    return a, b


class _RoundTemplate(Template):
    """ChatGLM-6B and ChatGLM2-6B: the whole prompt is one text, tokenized at once."""

    first_round = 0
    round_fmt = ""
    query_fmt = ""

    def prompt_text(self, history: list[tuple[str, str]], query: str) -> tuple[str, list[tuple[int, int]]]:
        """The prompt string and the character spans of the history answers inside it."""
        text, spans = "", []
        for i, (q, a) in enumerate(history):
            head = self.round_fmt.format(i=i + self.first_round, q=q)
            spans.append((len(text) + len(head), len(text) + len(head) + len(a)))
            text += head + a + self.round_sep
        text += self.query_fmt.format(i=len(history) + self.first_round, q=query)
        return text, spans

    round_sep = ""

    def _text_pieces(self, tok, history, query, prefix_ids: list[int],
                     history_labels: bool = True) -> list[tuple[list[int], list[int]]]:
        text, spans = self.prompt_text(history, query)
        ids = prefix_ids + _enc(tok, text)
        labels = [IGNORE] * len(ids)
        for start, end in spans if history_labels else ():
            a, b = _labels_in_text(tok, text[:start], text[start:end])
            off = len(prefix_ids)
            labels[off + a: off + b] = ids[off + a: off + b]
        has_history_labels = bool(spans) and history_labels and labels.count(IGNORE) < len(labels)
        return [(ids, labels if has_history_labels else [])]


class ChatGLM1Template(_RoundTemplate):
    name = "chatglm"
    first_round = 0
    round_fmt = "[Round {i}]\n问：{q}\n答："
    round_sep = "\n"
    query_fmt = "[Round {i}]\n问：{q}\n答："

    def prompt_text(self, history, query):
        if not history:  # ChatGLM-6B's own chat() sends a bare first query
            return query, []
        return super().prompt_text(history, query)

    def prompt_pieces(self, tok, conv, history, history_labels=True):
        pieces = self._text_pieces(tok, history, conv.query, [], history_labels)
        ids, labels = pieces[0]
        tail = [_id(tok, "[gMASK]"), _id(tok, "<sop>")]
        return [(ids + tail, (labels + [IGNORE, IGNORE]) if labels else [])]

    def answer_ids(self, tok, conv):
        return _enc(tok, conv.answer), [_id(tok, "<eop>")]

    def encode(self, tok, conv, max_source_length=512, max_target_length=512, train_on_history=False):
        # THUDM's ChatGLM-6B script supervises from <sop> (the last prompt token) onward.
        enc = super().encode(tok, conv, max_source_length, max_target_length, train_on_history)
        sop = enc.meta["answer_start"] - 1
        enc.labels[sop] = enc.input_ids[sop]
        return enc

    def stop_token_ids(self, tok):
        return [_id(tok, "<eop>")]


class ChatGLM2Template(_RoundTemplate):
    name = "chatglm2"
    first_round = 1
    round_fmt = "[Round {i}]\n\n问：{q}\n\n答："
    round_sep = "\n\n"
    query_fmt = "[Round {i}]\n\n问：{q}\n\n答："

    def prompt_pieces(self, tok, conv, history, history_labels=True):
        return self._text_pieces(tok, history, conv.query, [_id(tok, "[gMASK]"), _id(tok, "sop")], history_labels)

    def answer_ids(self, tok, conv):
        return _enc(tok, conv.answer), [tok.eos_token_id]

    def stop_token_ids(self, tok):
        return [tok.eos_token_id]


class ChatGLM3Template(Template):
    """Role tokens. THUDM's fine-tuning code (ChatGLM3's and GLM-4's) marks each message as learned or not
    (assistant messages, replies and tool calls alike, are; system, user and tool results are not) and then
    labels every token that follows a token of a learned message: the text after `<|assistant|>` and the one
    token after the message (the next role token or the end token). Tools: common/tools.py."""

    name = "chatglm3"
    prefix = ("[gMASK]", "sop")
    roles = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
             "observation": "<|observation|>"}
    supports_tools = True

    def _message(self, tok, role: str, content: str, metadata: str = "") -> list[int]:
        # As THUDM's build_single_message: the role token, "metadata\n" and the content, each encoded apart.
        return [_id(tok, self.roles[role])] + _enc(tok, f"{metadata}\n") + _enc(tok, content)

    def _step(self, tok, step: dict) -> tuple[list[int], bool]:
        """One answer step as a message: (ids, learned)."""
        if "call" in step:
            call = step["call"]
            metadata, text = self.tools.call_message(ToolCall(call["name"], call["arguments"]))
            return self._message(tok, "assistant", text, metadata), True
        if "observation" in step:
            return self._message(tok, "observation", step["observation"]), False
        return self._message(tok, "assistant", step["reply"]), True

    def _answer(self, tok, answer) -> list[tuple[list[int], bool]]:
        return [self._step(tok, s) for s in ([{"reply": answer}] if isinstance(answer, str) else answer)]

    @property
    def tools(self):
        return tool_format(self.name)

    def prompt_pieces(self, tok, conv, history, history_labels=True):
        msgs: list[tuple[list[int], bool]] = [([_id(tok, t) for t in self.prefix], False)]
        if conv.tools:
            msgs.append((self._message(tok, "system", self.tools.tools_system(conv.tools)), False))
        if conv.system:
            msgs.append((self._message(tok, "system", conv.system), False))
        for q, a in history:
            msgs.append((self._message(tok, "user", q), False))
            msgs += self._answer(tok, a)
        msgs.append((self._message(tok, "user", conv.query), False))
        msgs += [(ids, False) for ids, _ in (self._step(tok, s) for s in conv.pending)]
        # The answer's role token closes the prompt; it belongs to a learned message (the next token is learned).
        msgs.append(([_id(tok, self.roles["assistant"])], True))
        ids, labels = _shifted(msgs)
        return [(ids, labels if any(x != IGNORE for x in labels) else [])]

    def answer_tokens(self, tok, conv):
        msgs = self._answer(tok, conv.answer)
        msgs[0] = (msgs[0][0][1:], True)  # its role token is the prompt's last token
        msgs.append(([self.end_id(tok)], False))
        ids, labels = _shifted(msgs, after_learned=True)
        return ids, labels, len(ids) - 1

    def end_id(self, tok) -> int:
        return tok.eos_token_id

    def stop_token_ids(self, tok):
        return [self.end_id(tok), _id(tok, self.roles["user"]), _id(tok, self.roles["observation"])]

    def clean_reply(self, text: str) -> str:
        # The reply starts with a metadata line (empty for plain chat).
        return text[1:] if text.startswith("\n") else text


def _shifted(msgs: list[tuple[list[int], bool]], after_learned: bool = False) -> tuple[list[int], list[int]]:
    """ids and labels of messages: a token is labelled when the token before it belongs to a learned message
    (`after_learned`: whether the token before the first one did)."""
    ids: list[int] = []
    labels: list[int] = []
    prev = after_learned
    for piece, learned in msgs:
        for t in piece:
            ids.append(t)
            labels.append(t if prev else IGNORE)
            prev = learned
    return ids, labels


class GLM4Template(ChatGLM3Template):
    name = "glm4"
    prefix = ("[gMASK]", "<sop>")

    def end_id(self, tok) -> int:
        return _id(tok, "<|endoftext|>")


class HFTemplate(Template):
    """The tokenizer's own Jinja template; answers are found by rendering with and without them."""

    name = "hf"

    def _messages(self, conv: Conversation, history) -> list[dict]:
        msgs = [{"role": "system", "content": conv.system}] if conv.system else []
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": conv.query}]

    def _render(self, tok, msgs, gen: bool) -> list[int]:
        if not getattr(tok, "chat_template", None):
            raise ValueError("template 'hf' needs a tokenizer with a chat template (tokenizer_config.json)")
        out = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def prompt_pieces(self, tok, conv, history, history_labels=True):
        msgs = self._messages(conv, history)
        ids = self._render(tok, msgs, gen=True)
        labels = [IGNORE] * len(ids)
        for k in range(len(history) if history_labels else 0):
            upto = msgs[: (1 if conv.system else 0) + 2 * k + 1]
            a = len(self._render(tok, upto, gen=True))
            b = len(self._render(tok, msgs[: len(upto) + 1], gen=False))
            labels[a:b] = ids[a:b]
        return [(ids, labels if any(x != IGNORE for x in labels) else [])]

    def answer_ids(self, tok, conv):
        answer = conv.answer
        msgs = self._messages(conv, conv.history)
        prompt = self._render(tok, msgs, gen=True)
        full = self._render(tok, msgs + [{"role": "assistant", "content": answer}], gen=False)
        tail = full[len(prompt):]
        eos = tok.eos_token_id
        if eos is not None and eos in tail:
            cut = len(tail) - 1 - tail[::-1].index(eos)
            return tail[:cut], tail[cut:]
        return tail, []

    def stop_token_ids(self, tok):
        return [tok.eos_token_id] if tok.eos_token_id is not None else []


_BY_NAME: dict[str, Template] = {
    t.name: t for t in (ChatGLM1Template(), ChatGLM2Template(), ChatGLM3Template(), GLM4Template(), HFTemplate())
}


def get_template(name: str) -> Template:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}") from None
