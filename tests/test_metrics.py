"""Generation metrics (common/metrics.py) against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from common.metrics import average, bleu4_chars, rouge_jieba, score


def test_identical_replies_score_100_and_disjoint_ones_0():
    for text in ("中国的首都是北京。", "The capital is Beijing.", "北京 is the capital 首都"):
        s = score(text, text)
        assert all(s[k] == pytest.approx(100, abs=1e-4) for k in ("bleu-4_chars", "rouge-1_jieba",
                                                                  "rouge-2_jieba", "rouge-l_jieba", "exact_match"))
    s = score("苹果香蕉", "汽车火车")
    assert s["bleu-4_chars"] == 0 and s["rouge-l_jieba"] == 0 and s["exact_match"] == 0


def test_a_known_chinese_pair():
    # reference 我爱北京天安门 (7 characters; jieba: 我 / 爱 / 北京 / 天安门), reply 我爱北京 (4; 我 / 爱 / 北京)
    # BLEU-4 over characters: every n-gram of the reply matches (p1..p4 = 1); brevity penalty exp(1 - 7/4).
    assert bleu4_chars("我爱北京", "我爱北京天安门") == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-4)
    r = rouge_jieba("我爱北京", "我爱北京天安门")
    # ROUGE-1 and -L: 3 of the reply's 3 words, 3 of the reference's 4: F1 = 2 * 1 * 0.75 / 1.75
    assert r["rouge-1_jieba"] == pytest.approx(100 * 1.5 / 1.75, abs=1e-3)
    assert r["rouge-l_jieba"] == pytest.approx(100 * 1.5 / 1.75, abs=1e-3)
    # ROUGE-2: bigrams 我爱, 爱北京 of the reply; the reference has 3: P = 1, R = 2/3, F1 = 0.8
    assert r["rouge-2_jieba"] == pytest.approx(80, abs=1e-3)


def test_a_known_english_pair_counts_characters_for_bleu_and_words_for_rouge():
    # BLEU over characters: reply a,' ',b against a,' ',c (same length: no brevity penalty).
    # p1 = 2/3, p2 = 1/2 ("a "); no trigram matches and no 4-grams at all: method 3 gives the k-th empty
    # precision 1 / (2^k * its n-gram count, at least 1): p3 = 1/2, p4 = 1/4. BLEU = (2/3 * 1/2 * 1/2 * 1/4)^(1/4).
    assert bleu4_chars("a b", "a c") == pytest.approx(100 * (1 / 24) ** 0.25, abs=1e-6)
    r = rouge_jieba("a b", "a c")  # words: one of two in common
    assert r["rouge-1_jieba"] == pytest.approx(50, abs=1e-3) and r["rouge-2_jieba"] == 0


def test_mixed_text_is_segmented_into_words():
    r = rouge_jieba("模型 GLM 很好", "GLM 模型很好")
    assert r["rouge-1_jieba"] == pytest.approx(100, abs=1e-3)  # the same words, in another order
    assert r["rouge-l_jieba"] < 100


def test_empty_replies_and_references_score_0_and_never_raise():
    for reply, ref in [("", "北京"), ("北京", ""), ("", ""), ("   ", "北京"), ("北京", " \n ")]:
        s = score(reply, ref)
        assert {k: s[k] for k in ("bleu-4_chars", "rouge-1_jieba", "rouge-l_jieba", "exact_match")} == \
            {"bleu-4_chars": 0.0, "rouge-1_jieba": 0.0, "rouge-l_jieba": 0.0, "exact_match": 0.0}


def test_the_average_is_per_sample_as_llama_factory_reports_it():
    rows = [score("北京", "北京"), score("", "北京")]
    assert average(rows)["rouge-l_jieba"] == pytest.approx(50, abs=1e-3)
    assert average([])["bleu-4_chars"] == 0.0


def test_evaluation_reads_only_the_records_it_scores_and_names_a_bad_one(tmp_path, monkeypatch):
    import json

    import pytest

    from common.errors import DataError
    from common.evaluation import load_conversations
    from common.training import sources

    monkeypatch.setattr(sources, "CHUNK_RECORDS", 7)  # several chunks: reading stops in the middle of one

    good = {"instruction": "问", "input": "", "output": "答"}
    path = tmp_path / "data.jsonl"
    rows = [dict(good, instruction=f"q{i}") for i in range(50)]
    rows[40] = {"instruction": 3, "output": "x"}  # beyond the records scored: never read into a conversation
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    convs = load_conversations(str(path), 10)
    assert [c.query for c in convs] == [f"q{i}" for i in range(10)]
    with pytest.raises(DataError, match=r"record 40 \(line 41\), field 'instruction'"):
        load_conversations(str(path), 45)
