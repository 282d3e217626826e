"""Records → validated, tokenized examples, once per data and tokenization, cached as Parquet.

The pipeline (Ray Data, streaming, one task per chunk of a few thousand records):

    plan_sources (driver: one streaming pass per file, byte ranges)
      → map_batches(ChunkEncoder): read the chunk → check every record → conversation → template
        → (input_ids, labels) → part-NNNNNN.parquet in the cache folder, plus a small summary row
      → the driver collects only the summaries (problems, counts, token totals)

The cache folder is `<cache_root>/<name>-<key>/`, where the key hashes the data's content, the
tokenizer files, the template, the length limits and `train_on_history`; `manifest.json` is written
last (a folder without it is unfinished and never used). Any later run, resume, dry run or eval with
the same key reads it instead of tokenizing again. Delete the folder (or the whole cache root) to clear.

Small data (one chunk) is encoded in-process by the same `encode_chunk`: starting a Ray Data job costs
more than encoding a few thousand records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data import (
    MAX_REPORTED,
    Problem,
    check_record,
    eval_size,
    record_to_conversation,
    sample_positions,
)
from common.errors import DataError
from common.pairs import pair_conversations, pair_problems
from common.templates import IGNORE, Encoded, ExampleTooLong, get_template
from common.training.sources import Chunk, SourcePlan, content_hash_of, plan_sources, resolve_files

# Bump when the stored columns, or the ids a tokenizer gives the same text, change. 2: ChatGLM-6B splits its
# registered special strings out of the text (754ca55); caches written before hold the old ids.
PIPELINE_VERSION = 2
META_COLUMNS = ["id", "num_tokens", "num_targets", "multi_turn", "dropped_rounds", "answer_truncated"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class EncodeSpec:
    """Everything besides the data that the tokenized examples depend on."""

    tokenizer_path: str | None   # a local model folder; None: validate the records only
    template: str
    max_source_length: int
    max_target_length: int
    train_on_history: bool
    trust_remote_code: bool = False
    # preference pairs (--stage dpo): records with chosen and rejected answers, stored as one example whose
    # first `chosen_tokens` tokens are the chosen sequence and the rest the rejected one (common/pairs.py)
    pairs: bool = False

    def key(self, content_hash: str) -> str:
        parts = {"version": PIPELINE_VERSION, "data": content_hash, "tokenizer": tokenizer_digest(self.tokenizer_path),
                 "template": self.template, "max_source_length": self.max_source_length,
                 "max_target_length": self.max_target_length, "train_on_history": self.train_on_history}
        if self.pairs:
            parts["pairs"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_digest(folder: str | None) -> str:
    """Hash of the small files of a model folder (tokenizer, its config, chat template), not the weights."""
    if folder is None:
        return "-"
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.stat().st_size < (64 << 20):
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


# -- one chunk ---------------------------------------------------------------------------------------------

def _problem_dict(p: Problem, file: int) -> dict:
    return {"file": file, **asdict(p)}


def _supervised(labels: list[int]) -> int:
    """Tokens whose next token is learned (the label of position 0 predicts nothing)."""
    return len(labels) - 1 - labels.count(IGNORE) + (labels[0] == IGNORE)


def encode_record(record: dict, tok, template, spec: EncodeSpec):
    """(example, conversation it stores) of a valid record; a pair is its chosen sequence then its rejected one,
    with `meta["chosen_tokens"]` where they meet."""
    limits = (spec.max_source_length, spec.max_target_length, spec.train_on_history)
    if not spec.pairs:
        conv = record_to_conversation(record)
        return template.encode(tok, conv, *limits), conv
    chosen, rejected = pair_conversations(record)
    a, b = template.encode(tok, chosen, *limits), template.encode(tok, rejected, *limits)
    pair = Encoded(a.input_ids + b.input_ids, a.labels + b.labels, dropped_rounds=max(a.dropped_rounds, b.dropped_rounds),
                   answer_truncated=a.answer_truncated or b.answer_truncated,
                   meta={"chosen_tokens": len(a.input_ids), "targets": _supervised(a.labels) + _supervised(b.labels)})
    return pair, chosen


def encode_chunk(chunk: Chunk, tok, template_name: str, spec: EncodeSpec, out_dir: str | None) -> dict:
    """Check, convert and tokenize one chunk; write its examples to `out_dir`; return its summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common.training.sources import read_chunk

    t0 = time.time()
    template = get_template(template_name) if tok is not None else None
    check = pair_problems if spec.pairs else check_record
    cols: dict[str, list] = {name: [] for name in ("id", "input_ids", "labels", "num_tokens", "num_targets",
                                                    "multi_turn", "dropped_rounds", "answer_truncated",
                                                    "conversation", "chosen_tokens")}
    problems: list[dict] = []
    reasons: dict[str, int] = {}
    n_problems = n_invalid = n_too_long = 0
    too_long: list[int] = []
    for item in read_chunk(chunk):
        found = [item.problem] if item.problem else check(item.index, item.record)
        if found:
            n_invalid += 1
            for p in found:
                p.line = item.line if chunk.kind == "jsonl" else 0
                n_problems += 1
                reasons[p.reason()] = reasons.get(p.reason(), 0) + 1
                if len(problems) < MAX_REPORTED:
                    problems.append(_problem_dict(p, chunk.file))
            continue
        if template is None:
            continue
        try:
            enc, conv = encode_record(item.record, tok, template, spec)
        except ExampleTooLong:
            n_too_long += 1
            if len(too_long) < 10:
                too_long.append(item.id)
            continue
        cols["id"].append(item.id)
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
        cols["num_tokens"].append(len(enc.input_ids))
        cols["num_targets"].append(enc.meta["targets"] if "targets" in enc.meta else _supervised(enc.labels))
        cols["chosen_tokens"].append(enc.meta.get("chosen_tokens", 0))
        cols["multi_turn"].append(bool(conv.history))
        cols["dropped_rounds"].append(enc.dropped_rounds)
        cols["answer_truncated"].append(enc.answer_truncated)
        cols["conversation"].append(json.dumps(conv.to_dict(), ensure_ascii=False))
    if out_dir is not None:
        ids_type = pa.list_(pa.int32())
        table = pa.table({
            "id": pa.array(cols["id"], pa.int64()), "input_ids": pa.array(cols["input_ids"], ids_type),
            "labels": pa.array(cols["labels"], ids_type), "num_tokens": pa.array(cols["num_tokens"], pa.int32()),
            "num_targets": pa.array(cols["num_targets"], pa.int32()),
            "multi_turn": pa.array(cols["multi_turn"], pa.bool_()),
            "dropped_rounds": pa.array(cols["dropped_rounds"], pa.int16()),
            "answer_truncated": pa.array(cols["answer_truncated"], pa.bool_()),
            "conversation": pa.array(cols["conversation"], pa.string()),
            **({"chosen_tokens": pa.array(cols["chosen_tokens"], pa.int32())} if spec.pairs else {})})
        final = Path(out_dir) / part_name(chunk.number)
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(final)  # a retried task rewrites the same file: idempotent
    return {"number": chunk.number, "records": chunk.count, "valid": chunk.count - n_invalid, "invalid": n_invalid, "problems": n_problems, "first_problems": problems,
            "reasons": reasons, "too_long": n_too_long, "too_long_ids": too_long, "examples": len(cols["id"]),
            "tokens": int(sum(cols["num_tokens"])), "seconds": time.time() - t0}


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def _load_tokenizer(spec: EncodeSpec):
    if spec.tokenizer_path is None:
        return None
    from common.models.loader import detect, load_tokenizer

    return load_tokenizer(detect(Path(spec.tokenizer_path)), spec.trust_remote_code)


class ChunkEncoder:
    """The Ray Data stage: one actor per CPU, the tokenizer loaded once per actor."""

    def __init__(self, spec: EncodeSpec, out_dir: str | None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor
        self.spec, self.out_dir = spec, out_dir
        self.tok = _load_tokenizer(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["number"])
        summaries = []
        for i in range(n):
            chunk = Chunk(**{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()})
            summaries.append(encode_chunk(chunk, self.tok, self.spec.template, self.spec, self.out_dir))
        # Nested values travel as JSON text: Arrow would give every summary the first one's schema.
        return {"summary": [json.dumps(s, ensure_ascii=False) for s in summaries]}


# -- the whole set -----------------------------------------------------------------------------------------

@dataclass
class TokenizedSet:
    """A finished cache folder (or, when validating only, just the summaries)."""

    spec_text: str               # the --data_path it came from
    files: list[str]
    manifest: dict
    path: Path | None            # None: validated only, nothing stored
    from_cache: bool = False

    @property
    def parts(self) -> list[str]:
        assert self.path is not None
        return [str(self.path / part_name(c["number"])) for c in self.manifest["chunks"]]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def problems(self) -> list[Problem]:
        return [Problem(**{k: v for k, v in p.items() if k != "file"}) for p in self.manifest["first_problems"]]

    def check(self, skip_invalid: bool) -> None:
        """Raise the bad records as one DataError, unless they may be skipped."""
        m = self.manifest
        if m["invalid"] and not skip_invalid:
            shown = "\n".join(f"  - {Problem(**{k: v for k, v in p.items() if k != 'file'}).describe(self.files[p['file']])}"
                              for p in m["first_problems"])
            more = m["problems"] - len(m["first_problems"])
            more_text = f"\n  ... and {more} more problem(s)" if more > 0 else ""
            raise DataError(f"{self.spec_text}: {m['invalid']} of {m['records']} record(s) are invalid:\n{shown}"
                            f"{more_text}\nFix them, or pass --skip_invalid_records to drop them.")
        if m["invalid"] == m["records"]:
            raise DataError(f"{self.spec_text}: all {m['records']} record(s) are invalid; nothing left to train on.")

    def read_columns(self, columns: list[str], ids: np.ndarray | None = None, exclude: bool = False):
        """Columns of the stored examples (all, only `ids`, or all but `ids`), as one Arrow table."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = []
        for part in self.parts:
            t = pq.read_table(part, columns=list(dict.fromkeys(["id", *columns])))
            if ids is not None:
                mask = pc.is_in(t["id"], value_set=pa.array(ids, pa.int64()))
                t = t.filter(pc.invert(mask) if exclude else mask)
            tables.append(t.select(columns))
        return pa.concat_tables(tables)


def _merge_summaries(summaries: list[dict]) -> dict:
    summaries = sorted(summaries, key=lambda s: s["number"])
    reasons: dict[str, int] = {}
    for s in summaries:
        for k, v in s["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    first = [p for s in summaries for p in s["first_problems"]][:MAX_REPORTED]
    too_long = [i for s in summaries for i in s["too_long_ids"]][:10]
    total = {k: sum(s[k] for s in summaries) for k in ("records", "valid", "invalid", "problems", "too_long",
                                                        "examples", "tokens")}
    return {**total, "first_problems": first, "reasons": reasons, "too_long_ids": too_long,
            "chunks": [{"number": s["number"], "records": s["records"], "examples": s["examples"]} for s in summaries]}


def cache_folder(cache_root: str | Path, data_path: str, key: str) -> Path:
    stem = Path(data_path.split(",")[0].rstrip("/*")).name.split(".")[0] or "data"
    return Path(cache_root).expanduser().resolve() / f"{stem}-{key}"


def tokenize(data_path: str, spec: EncodeSpec, cache_root: str | Path | None, *,
             start_ray: Callable[[], int] | None = None, log: Callable[[str], None] = print) -> TokenizedSet:
    """The tokenized set for `data_path`: from the cache when it holds one, else made (and cached).

    `start_ray` connects to Ray and returns the CPUs to use; it is only called when the data needs
    more than one chunk and nothing is cached. With `spec.tokenizer_path=None` (or no cache root) the
    records are checked but nothing is stored."""
    files = [p for p, _ in resolve_files(data_path)]
    store = spec.tokenizer_path is not None and cache_root is not None
    if store:
        content = content_hash_of(data_path)
        folder = cache_folder(cache_root, data_path, spec.key(content))
        manifest_file = folder / "manifest.json"
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            log(f"data cache: using {folder} ({manifest['examples']:,} examples, {manifest['tokens']:,} tokens, "
                f"tokenized {manifest['created']})")
            return TokenizedSet(data_path, files, manifest, folder, from_cache=True)
    t0 = time.time()
    tok = _load_tokenizer(spec)
    if tok is not None:  # a template that does not fit the tokenizer fails here, once, not in every task
        from common.data import Conversation

        get_template(spec.template).encode(tok, Conversation(history=[("q", "a")], query="q", answer="a"))
    plan = plan_sources(data_path)
    staging = None
    if store:
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    what = "tokenizing" if spec.tokenizer_path else "checking"
    if len(plan.chunks) == 1 or start_ray is None:
        summaries = [encode_chunk(c, tok, spec.template, spec, str(staging) if staging else None) for c in plan.chunks]
        cpus = 1
    else:
        cpus = start_ray()
        log(f"{what} {plan.num_records:,} records in {len(plan.chunks)} chunks on {cpus} CPU(s) with Ray Data")
        summaries = _run_ray_data(plan, spec, str(staging) if staging else None, cpus)
    seconds = time.time() - t0
    manifest = {**_merge_summaries(summaries), "content_hash": plan.content_hash, "data_path": data_path,
                "files": plan.files, "spec": asdict(spec), "seconds": round(seconds, 2), "cpus": cpus,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    rate = manifest["records"] / max(seconds, 1e-9)
    if not store:
        return TokenizedSet(data_path, files, manifest, None)
    (staging / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    try:
        staging.rename(folder)
    except OSError:  # another run finished the same set first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    log(f"data: {what.replace('izing', 'ized').replace('ing', 'ed')} {manifest['records']:,} records in {seconds:.1f} s "
        f"({rate:,.0f} records/s, {rate / cpus:,.0f} per CPU); {manifest['examples']:,} examples, "
        f"{manifest['tokens']:,} tokens; cache: {folder}")
    return TokenizedSet(data_path, files, manifest, folder)


def _run_ray_data(plan: SourcePlan, spec: EncodeSpec, out_dir: str | None, cpus: int) -> list[dict]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    items = [asdict(c) for c in plan.chunks]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 10_000))
    pool = ray.data.ActorPoolStrategy(size=max(1, min(cpus, len(items))))
    out = ds.map_batches(ChunkEncoder, fn_constructor_kwargs={"spec": spec, "out_dir": out_dir},
                         batch_size=1, compute=pool, num_cpus=1)
    return [json.loads(row["summary"]) for row in out.iter_rows()]


# -- the train/eval split ------------------------------------------------------------------------------------

def pick_eval_ids(ids: np.ndarray, eval_ratio: float, seed: int, max_eval: int | None) -> np.ndarray:
    """Deterministic held-out ids: the same ids, ratio and seed always pick the same ones (sorted)."""
    return sample_ids(ids, eval_size(len(ids), eval_ratio, max_eval), seed)


def sample_ids(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` of `ids`, chosen by `seed` (sorted)."""
    return np.sort(np.asarray(ids, dtype=np.int64)[sample_positions(len(ids), n, seed)])


def write_subset(ts: TokenizedSet, ids: np.ndarray, label: str) -> str:
    """The rows of `ids` as one Parquet file inside the cache folder (made once, then reused)."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:12]
    out = ts.path / f"{label}-{digest}.parquet"
    if not out.is_file():
        cols = ["id", "input_ids", "labels", "num_tokens", "num_targets", "conversation"]
        if ts.manifest.get("spec", {}).get("pairs"):
            cols.append("chosen_tokens")
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(ts.read_columns(cols, ids), tmp, compression="zstd")
        tmp.replace(out)
    return str(out)


def conversations(parquet_file: str, n: int) -> list[dict[str, Any]]:
    """The first `n` stored conversations of a subset file (eval prompts for samples and the merge check)."""
    import pyarrow.parquet as pq

    col = pq.read_table(parquet_file, columns=["conversation"])["conversation"].to_pylist()[:n]
    return [json.loads(c) for c in col]
