"""Generation metrics for Chinese (and mixed) replies, computed the way our users' tools compute them.

LLaMA-Factory and ChatGLM-Efficient-Tuning (`predict_with_generate`) score every reply against its reference
and average over samples, each score x100:

- `bleu-4_chars`: sentence BLEU-4 over characters (`list(text)`: every character is a token, spaces too),
  uniform 4-gram weights, Chen & Cherry's smoothing method 3 (NIST geometric sequence), as nltk's
  `sentence_bleu(..., smoothing_function=SmoothingFunction().method3)` computes it;
- `rouge-1_jieba`, `rouge-2_jieba`, `rouge-l_jieba`: ROUGE-1/2/L F1 over jieba words (jieba's default mode,
  words joined by spaces), as `rouge_chinese.Rouge().get_scores` computes it (ROUGE-L is the summary-level
  union LCS over sentences cut at 。！？);
- `exact_match`: 100 when the reply equals the reference (both stripped), else 0;
- `reply_chars`: the reply's length in characters (not x100).

An empty reply or reference scores 0 (never raises), as LLaMA-Factory does. We call the same packages
(nltk, jieba, rouge-chinese), so the numbers are theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

SCORES = ("bleu-4_chars", "rouge-1_jieba", "rouge-2_jieba", "rouge-l_jieba", "exact_match", "reply_chars")
# What `--best_metric` may name: the metric a training run reports at each eval, and which way is better.
BEST_METRICS = {"eval_loss": ("eval_loss", "min"), "bleu-4": ("eval_bleu-4_chars", "max"),
                "rouge-l": ("eval_rouge-l_jieba", "max"), "eval_rewards_accuracy": ("eval_rewards_accuracy", "max")}


def _words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it prints the dictionary loading otherwise
    return [w for w in jieba.lcut(text) if w.strip()]


def bleu4_chars(reply: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not reply or not reference:
        return 0.0
    return 100.0 * sentence_bleu([list(reference)], list(reply), smoothing_function=SmoothingFunction().method3)


def rouge_jieba(reply: str, reference: str) -> dict[str, float]:
    from rouge_chinese import Rouge

    hyp, ref = " ".join(_words(reply)), " ".join(_words(reference))
    if not hyp.split() or not ref.split():
        return {"rouge-1_jieba": 0.0, "rouge-2_jieba": 0.0, "rouge-l_jieba": 0.0}
    scores = Rouge().get_scores(hyp, ref)[0]
    return {f"{k}_jieba": 100.0 * scores[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}


def score(reply: str, reference: str) -> dict[str, float]:
    """Every score of one reply against its reference."""
    return {"bleu-4_chars": bleu4_chars(reply, reference), **rouge_jieba(reply, reference),
            "exact_match": 100.0 if reply.strip() == reference.strip() and reference.strip() else 0.0,
            "reply_chars": float(len(reply))}


def average(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """The per-sample mean of each score (what LLaMA-Factory reports)."""
    rows = list(rows)
    return {k: sum(r[k] for r in rows) / len(rows) for k in SCORES} if rows else {k: 0.0 for k in SCORES}
