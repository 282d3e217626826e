"""Bad data stops the dry run with one clear message naming file, record and field; no traceback."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest
from conftest import run_job

from common.data import check_record, content_hash, load_dataset, split
from common.errors import DataError, run_cli

GOOD = {"instruction": "你好", "input": "", "output": "你好！"}


def finetune_in_process(*args: str) -> subprocess.CompletedProcess:
    """jobs/finetune.py's entry point run here, as `run_cli` runs it in the script: its exit code and what it
    printed. A new interpreter would spend ~4 s importing torch and transformers per case; the script as its
    own process is what tests/test_finetune.py's and test_config.py's user-error tests run."""
    from jobs.finetune import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, list(args))
        except SystemExit as end:
            code = end.code or 0
    return subprocess.CompletedProcess(["jobs/finetune.py", *args], code, out.getvalue(), err.getvalue())


def dry_run(tmp_path, content: bytes | str, name: str = "data.json", *extra: str, run=finetune_in_process):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path, run("--dry_run", "--data_path", str(path), *extra)


def assert_user_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, f"{f!r} not in:\n{proc.stderr}"


BAD_FILES = {
    "invalid JSON with line and column": ('[\n {"instruction": "a" "output": "b"}\n]', ["invalid JSON at line 2, column 22"]),
    "not a list": ('{"instruction": "a", "output": "b"}', ["expected a JSON list of records, found an object"]),
    "record not an object": ('[{"instruction": "a", "output": "b"}, "text"]',
                             ["record 1", "expected an object", "found the string 'text'"]),
    "missing instruction": ('[{"output": "b"}]', ["record 0, field 'instruction'", "no such field"]),
    "empty output": ('[{"instruction": "a", "output": "  "}]', ["record 0, field 'output'", "found an empty string"]),
    "non-string output": ('[{"instruction": "a", "output": 3}]', ["field 'output'", "found the number 3"]),
    "bad history shape": ('[{"instruction": "a", "output": "b", "history": [["q"]]}]',
                          ["field 'history[0]'", "a [question, answer] pair of strings"]),
    "history not a list": ('[{"instruction": "a", "output": "b", "history": "q"}]', ["field 'history'"]),
    "input not a string": ('[{"instruction": "a", "output": "b", "input": 1}]', ["field 'input'"]),
    "empty file": ("", ["the file is empty"]),
    "empty list": ("[]", ["holds no records"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_json_file_is_one_clear_message(tmp_path, case):
    content, fragments = BAD_FILES[case]
    path, proc = dry_run(tmp_path, content)
    assert_user_error(proc, str(path), *fragments)


def test_non_utf8_bytes_are_reported_with_offset(tmp_path):
    path, proc = dry_run(tmp_path, b'[{"instruction": "' + "你好".encode("gbk") + b'", "output": "b"}]')
    assert_user_error(proc, str(path), "not UTF-8 text", "offset 18", "line 1")


def test_broken_jsonl_line_is_reported_with_its_number(tmp_path):
    path, proc = dry_run(tmp_path, json.dumps(GOOD) + "\n\n" + '{"instruction": "a",\n', "data.jsonl")
    assert_user_error(proc, str(path), "line 3 is not valid JSON")


def test_several_bad_records_show_the_first_few_and_the_count(tmp_path):
    records = [GOOD] + [{"instruction": "", "output": "x"}] * 8
    path, proc = dry_run(tmp_path, json.dumps(records))
    assert_user_error(proc, "8 of 9 record(s) are invalid", "record 1,", "record 5,", "... and 3 more",
                      "--skip_invalid_records")
    assert "record 6," not in proc.stderr


def test_skip_invalid_records_drops_them_and_says_why(tmp_path, tiny_model):
    records = [GOOD, {"instruction": "", "output": "x"}, {"instruction": "q"}, 7, GOOD]
    _, proc = dry_run(tmp_path, json.dumps(records), "data.json", "--skip_invalid_records",
                      "--base_model", str(tiny_model), run=lambda *args: run_job("jobs/finetune.py", *args))
    assert proc.returncode == 0, proc.stderr
    assert "2 valid, 3 skipped" in proc.stdout
    assert "instruction: expected a non-empty string: 1" in proc.stdout
    assert "output: expected a non-empty string: 1" in proc.stdout


def test_dry_run_prints_statistics_and_writes_only_the_data_cache(tmp_path, tiny_model):
    args = ("jobs/finetune.py", "--dry_run", "--base_model", str(tiny_model), "--output_dir", str(tmp_path / "out"),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path}/m.db")
    proc = run_job(*args)
    assert proc.returncode == 0, proc.stderr
    assert "200 valid, 0 skipped; train 190, eval 10" in proc.stdout
    assert "template chatglm2" in proc.stdout and "supervised" in proc.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["data_cache"] and not (tmp_path / "m.db").exists()
    again = run_job(*args)
    assert "data cache: using" in again.stdout
    stats = lambda out: [line for line in out.splitlines() if line.startswith("  ")]  # noqa: E731
    assert stats(again.stdout) == stats(proc.stdout)


def test_a_separate_eval_file_is_validated_too(tmp_path):
    (tmp_path / "eval.json").write_text('[{"instruction": "a"}]')
    _, proc = dry_run(tmp_path, json.dumps([GOOD]), "train.json", "--eval_data_path", str(tmp_path / "eval.json"))
    assert_user_error(proc, "eval.json: 1 of 1 record(s) are invalid", "field 'output'")


def test_a_saved_datasets_folder_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "output": "再见"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r["output"] for r in load_dataset(str(tmp_path / "ds")).records] == ["你好！", "再见"]


def test_split_is_deterministic_and_disjoint():
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(100)]
    a = split(records, 0.1, seed=1)
    assert a == split(records, 0.1, seed=1)
    assert len(a[1]) == 10 and len(a[0]) == 90
    assert not {r["instruction"] for r in a[0]} & {r["instruction"] for r in a[1]}
    assert split(records, 0.1, seed=2)[1] != a[1]


def test_content_hash_changes_with_any_record():
    records = [dict(GOOD), {"instruction": "b", "output": "c"}]
    h = content_hash(records)
    assert h == content_hash([dict(r) for r in records])
    records[1]["output"] = "d"
    assert content_hash(records) != h


def test_check_record_accepts_the_seed_format():
    rec = {"instruction": "q", "input": "", "output": "a", "history": [["q0", "a0"], ["q1", "a1"]]}
    assert check_record(0, rec) == []


def test_a_missing_file_is_a_data_error():
    with pytest.raises(DataError, match="no such file"):
        load_dataset("does/not/exist.json")
