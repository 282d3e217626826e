"""The data pipeline: files → chunks → validated, tokenized Parquet cache → deterministic epoch plans.

The unit tests here run the chunk encoder in-process (what small data does); tests/test_data_at_scale.py
runs the same code through Ray Data and Ray Train.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import common.training.sources as sources
from common.training.epochs import BatchReader, ParquetExamples, plan_epoch, step_micro_batches, steps_in
from common.training.tokenize_cache import EncodeSpec, pick_eval_ids, tokenize

TRICKY = [
    {"instruction": "括号 ] 和 [ 还有 }, {", "output": "逗号, 引号 \" 反斜杠 \\", "history": [["a\nb", "c"]]},
    {"instruction": "emoji 🙂 and \u00e9", "input": "x", "output": "y"},
    {"instruction": "q", "output": "a" * 300},
]


def records(n: int) -> list[dict]:
    return [{**TRICKY[i % 3], "instruction": f"{TRICKY[i % 3]['instruction']} #{i}"} for i in range(n)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 records and 64-byte read blocks: every boundary case shows up in small files."""
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 7)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 64)


def read_back(spec: str) -> list:
    plan = sources.plan_sources(spec)
    items = [item for chunk in plan.chunks for item in sources.read_chunk(chunk)]
    assert [i.id for i in items] == list(range(plan.num_records))
    return items


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_splits_into_chunks_that_read_back_every_record(tmp_path, small_chunks, indent):
    recs = records(50)
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, ensure_ascii=False, indent=indent).encode())
    items = read_back(str(path))
    assert [i.record for i in items] == recs
    assert [i.index for i in items] == list(range(50))


def test_jsonl_chunks_keep_record_indices_and_line_numbers(tmp_path, small_chunks):
    recs = records(30)
    lines = []
    for i, r in enumerate(recs):
        lines.append(json.dumps(r, ensure_ascii=False))
        if i % 4 == 0:
            lines.append("")  # blank lines count as lines, not as records
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    items = read_back(str(tmp_path / "d.jsonl"))
    assert [i.record for i in items] == recs
    for item in items:
        assert lines[item.line - 1] == json.dumps(recs[item.index], ensure_ascii=False)


def test_several_files_a_glob_and_parquet_read_as_one_set(tmp_path, small_chunks):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = records(40)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:15]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs[15:24]))
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string()),
                        ("history", pa.list_(pa.list_(pa.string())))])
    pq.write_table(pa.Table.from_pylist(recs[24:], schema=schema), tmp_path / "c.parquet", row_group_size=4)
    glob_items = read_back(str(tmp_path / "*.jsonl"))
    assert [i.record for i in glob_items] == recs[:24]
    assert [i.index for i in glob_items] == list(range(15)) + list(range(9))  # indices are per file
    listed = read_back(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'},{tmp_path / 'c.parquet'}")
    got = [{k: v for k, v in i.record.items() if v is not None} for i in listed]
    assert got == [{k: v for k, v in r.items()} for r in recs]


def test_a_syntax_error_deep_in_a_json_list_names_line_and_column(tmp_path, small_chunks):
    text = json.dumps(records(40), ensure_ascii=False, indent=1)
    lines = text.split("\n")
    bad_line = max(i for i, line in enumerate(lines, start=1) if '"output":' in line)
    lines[bad_line - 1] = lines[bad_line - 1].replace('"output":', '"output"', 1)  # drop a colon
    (tmp_path / "d.json").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(sources.DataError, match=f"invalid JSON at line {bad_line}, column"):
        sources.plan_sources(str(tmp_path / "d.json"))


def spec_for(model, **kw) -> EncodeSpec:
    base = {"tokenizer_path": str(model), "template": "chatglm2", "max_source_length": 256,
            "max_target_length": 256, "train_on_history": False}
    return EncodeSpec(**{**base, **kw})


def test_the_cache_is_reused_and_invalidated_by_data_template_or_limits(tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records(20), ensure_ascii=False))
    root = tmp_path / "cache"
    first = tokenize(str(data), spec_for(tiny_model), root, log=lambda _: None)
    again = tokenize(str(data), spec_for(tiny_model), root, log=lambda _: None)
    assert not first.from_cache and again.from_cache and again.path == first.path
    assert again.manifest["tokens"] == first.manifest["tokens"] > 0
    changed = {
        "a limit": tokenize(str(data), spec_for(tiny_model, max_target_length=64), root, log=lambda _: None),
        "the template": tokenize(str(data), spec_for(tiny_model, template="hf"), root, log=lambda _: None),
        "train_on_history": tokenize(str(data), spec_for(tiny_model, train_on_history=True), root, log=lambda _: None),
    }
    data.write_text(json.dumps(records(21), ensure_ascii=False))
    changed["the data"] = tokenize(str(data), spec_for(tiny_model), root, log=lambda _: None)
    for what, ts in changed.items():
        assert not ts.from_cache and ts.path != first.path, what
    assert len({ts.path for ts in changed.values()}) == 4


def test_stored_examples_are_what_the_template_makes(tmp_path, tiny_model, tiny_tokenizer):
    from common.data import record_to_conversation
    from common.templates import get_template

    recs = records(9)
    (tmp_path / "d.json").write_text(json.dumps(recs, ensure_ascii=False))
    ts = tokenize(str(tmp_path / "d.json"), spec_for(tiny_model, train_on_history=True), tmp_path / "c",
                  log=lambda _: None)
    stored = ts.read_columns(["id", "input_ids", "labels"]).to_pylist()
    template = get_template("chatglm2")
    for row in stored:
        enc = template.encode(tiny_tokenizer, record_to_conversation(recs[row["id"]]), 256, 256, True)
        assert (row["input_ids"], row["labels"]) == (enc.input_ids, enc.labels)


def test_the_eval_split_is_deterministic_bounded_and_disjoint():
    ids = np.arange(10_000) * 3
    a = pick_eval_ids(ids, 0.05, seed=1, max_eval=200)
    assert np.array_equal(a, pick_eval_ids(ids, 0.05, seed=1, max_eval=200))
    assert len(a) == 200 and set(a) <= set(ids)
    assert not np.array_equal(a, pick_eval_ids(ids, 0.05, seed=2, max_eval=200))
    assert len(pick_eval_ids(np.arange(20), 0.05, seed=1, max_eval=200)) == 1
    assert len(pick_eval_ids(np.arange(1), 0.5, seed=1, max_eval=200)) == 0


@pytest.fixture
def stored(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 25)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records(400)))
    return tokenize(str(tmp_path / "d.jsonl"), spec_for(tiny_model), tmp_path / "c", log=lambda _: None)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3), (3, 2)])
def test_every_example_is_in_exactly_one_micro_batch_per_epoch_across_workers(stored, world, accum):
    src = ParquetExamples(stored.parts, exclude=np.array([3, 77, 150]))
    assert len(stored.parts) == 16 and len(src) == 397
    for epoch in (0, 1):
        plan = plan_epoch(src, epoch=epoch, seed=5, packing=True, max_tokens=600, batch_size=1, window_examples=60)
        per_step = world * accum
        seen = {rank: [] for rank in range(world)}
        for step in range(steps_in(plan, per_step)):
            group = list(step_micro_batches(plan, step, per_step))
            for rank in range(world):
                seen[rank] += [int(src.ids[i]) for b in group[rank::world] for i in plan.examples(b)]
        everything = [i for ids in seen.values() for i in ids]
        assert sorted(everything) == sorted(src.ids.tolist())
        assert all(plan.tokens <= 600)


def test_epoch_plans_are_deterministic_differ_by_epoch_and_read_the_stored_tokens(stored):
    src = ParquetExamples(stored.parts)
    kw = {"seed": 5, "packing": True, "max_tokens": 600, "batch_size": 1, "window_examples": 60}
    a, b, c = (plan_epoch(src, epoch=e, **kw) for e in (0, 0, 1))
    assert np.array_equal(a.order, b.order) and np.array_equal(a.bounds, b.bounds)
    assert not np.array_equal(a.order, c.order)
    # Windows bound what a worker holds: at most ~60 examples' parts at a time (here 3 parts of 25).
    assert all(sum(np.sum(src.part == p) for p in w) <= 60 for w in a.windows)
    reader = BatchReader(src, a, packing=True, max_tokens=600, pad_id=0)
    rows = stored.read_columns(["id", "input_ids"]).to_pylist()
    by_id = {r["id"]: r["input_ids"] for r in rows}
    for mb in range(len(a)):
        batch = reader.batch(mb)
        expected = [t for i in a.examples(mb) for t in by_id[int(src.ids[i])]]
        assert batch.input_ids[0].tolist() == expected
        assert batch.num_targets == a.targets[mb] and batch.num_tokens == a.tokens[mb]
        assert len(reader.loaded) <= 6  # the current window and the one before
