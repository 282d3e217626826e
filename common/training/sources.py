"""Where training records come from: files split into chunks that tasks read on their own.

`plan_sources(spec)` turns `--data_path` (a JSON list, JSONL, Parquet, several of them as a
comma-separated list or a glob, a saved `datasets` folder or a hub dataset name) into `Chunk`s of a few
thousand records each, streaming: no file is ever held whole in memory. A chunk knows its byte range
(or row range), the 0-based index of its first record within its file, the line of its first byte and
its global id, so `read_chunk` can run anywhere on the cluster and still name a bad record exactly.

Problems with a whole file (not UTF-8, broken JSON syntax in a JSON list, not a list, empty) are found
here and raised as one `DataError`; problems with single records are found by `read_chunk` and by
`common.data.check_record`, per record.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import Problem, _describe_value
from common.errors import DataError

# Records per chunk: one Ray Data task, one cached Parquet file. Tests lower it to send small files
# through the multi-chunk path.
CHUNK_RECORDS = int(os.environ.get("GLMOPS_DATA_CHUNK_RECORDS", "4096"))
BLOCK_BYTES = 4 << 20      # read size of the streaming scans
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Chunk:
    file: int          # position of the file in the source list
    path: str
    kind: str          # json | jsonl | parquet | arrow
    start: int         # byte offset (json, jsonl) or row (parquet, arrow) of the first record
    end: int           # byte offset / row just past the last record
    first_index: int   # 0-based record index within the file
    first_line: int    # 1-based line of `start` (json, jsonl; 0 otherwise)
    first_id: int      # global record id across all files
    count: int         # records in the chunk
    number: int        # position of the chunk in the plan


@dataclass
class SourcePlan:
    spec: str
    files: list[str]
    content_hash: str
    chunks: list[Chunk]

    @property
    def num_records(self) -> int:
        return sum(c.count for c in self.chunks)


# -- which files ---------------------------------------------------------------------------------------

def _kind(path: Path, head: bytes) -> str:
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".arrow":
        return "arrow"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix != ".json" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "jsonl"
    return "json"


def _is_hub_name(spec: str) -> bool:
    return "/" in spec and not spec.startswith((".", "/", "~")) and not Path(spec).suffix and not Path(spec).exists()


def resolve_files(spec: str) -> list[tuple[str, str]]:
    """(path, kind) of every file behind `spec`, in a fixed order."""
    parts = [s.strip() for s in spec.split(",") if s.strip()] if "," in spec else [spec]
    out: list[tuple[str, str]] = []
    for part in parts:
        if any(c in part for c in "*?["):
            matches = sorted(glob.glob(part, recursive=True))
            if not matches:
                raise DataError(f"{part}: the pattern matches no file.")
            paths = [Path(m) for m in matches if Path(m).is_file()]
        elif Path(part).is_dir():
            if (Path(part) / "state.json").is_file() or (Path(part) / "dataset_dict.json").is_file():
                out += [(f, "arrow") for f in _datasets_arrow_files(part)]
                continue
            paths = sorted(p for p in Path(part).iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
            if not paths:
                raise DataError(f"{part}: a folder with no .json, .jsonl or .parquet files and no saved `datasets`.")
        elif Path(part).is_file():
            paths = [Path(part)]
        elif _is_hub_name(part):
            out += [(f, "arrow") for f in _datasets_arrow_files(part)]
            continue
        else:
            raise DataError(f"{part}: no such file. Pass --data_path a JSON/JSONL/Parquet file (or several, "
                            "comma-separated or as a glob), a saved `datasets` folder or a hub dataset name.")
        for p in paths:
            with p.open("rb") as f:
                out.append((str(p), _kind(p, f.read(64))))
    return out


def _datasets_arrow_files(spec: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(spec) if Path(spec).is_dir() else datasets.load_dataset(spec)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the cause
        raise DataError(f"{spec}: cannot load as a JSON/JSONL file, a saved `datasets` folder or a hub dataset: "
                        f"{type(err).__name__}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{spec}: the dataset has splits {list(ds)}, none named 'train'.")
        ds = ds["train"]
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise DataError(f"{spec}: the dataset lives only in memory; save it with `save_to_disk` and pass the folder.")
    return files


# -- planning: one streaming pass per file ---------------------------------------------------------------

def plan_sources(spec: str) -> SourcePlan:
    files = resolve_files(spec)
    chunks: list[Chunk] = []
    h = hashlib.sha256()
    next_id = 0
    for fid, (path, kind) in enumerate(files):
        h.update(f"{kind}\n".encode())
        planner = {"json": _plan_json_list, "jsonl": _plan_jsonl, "parquet": _plan_parquet,
                   "arrow": _plan_arrow}[kind]
        file_chunks = planner(Path(path), fid, next_id, len(chunks), h)
        if not file_chunks and len(files) == 1:
            raise DataError(f"{path}: holds no records. Expected a list of "
                            '{"instruction", "input", "output", "history"} records.')
        chunks += file_chunks
        next_id += sum(c.count for c in file_chunks)
    if not chunks:
        raise DataError(f"{spec}: holds no records.")
    return SourcePlan(spec, [p for p, _ in files], h.hexdigest()[:16], chunks)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def content_hash_of(spec: str) -> str:
    """The data's identity without parsing it (the cache key of a run that already tokenized it)."""
    h = hashlib.sha256()
    for path, kind in resolve_files(spec):
        h.update(f"{kind}\n".encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()[:16]


class _Text:
    """A file decoded as UTF-8 block by block; reports bad bytes with their offset and line."""

    def __init__(self, path: Path):
        self.path, self.f = path, path.open("rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.offset = 0       # bytes read so far
        self.newlines = 0     # newlines in the bytes read so far
        self.digest = hashlib.sha256()
        self.eof = False
        self.first = True
        self.had_bom = False

    def read(self) -> str:
        return self.read_checked()[1]

    def read_checked(self) -> tuple[bytes, str]:
        """The next block as bytes and as text (the bytes checked to be UTF-8 either way)."""
        raw = self.f.read(BLOCK_BYTES)
        self.eof = len(raw) < BLOCK_BYTES
        if self.eof:
            self.f.close()
        pending = self.decoder.getstate()[0]  # the start of a character cut by the last block
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as err:
            data = pending + raw
            at = self.offset - len(pending) + err.start
            line = self.newlines + data[: err.start].count(b"\n") + 1
            raise DataError(f"{self.path}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {at} (line {line}). "
                            "Save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.json > out.json`).") from None
        self.digest.update(raw)
        self.offset += len(raw)
        self.newlines += raw.count(b"\n")
        if self.first:
            self.first, self.had_bom = False, text.startswith("\ufeff")
            text = text[1:] if self.had_bom else text
        return raw, text


def _plan_jsonl(path: Path, fid: int, first_id: int, first_number: int, h) -> list[Chunk]:
    """Chunks at line starts every CHUNK_RECORDS non-empty lines. Lines are parsed by the tasks."""
    src = _Text(path)
    chunks: list[Chunk] = []
    carry = b""
    pos = 0            # byte offset of the next line's start
    line_no = 1
    index = 0          # records so far in this file
    start, start_line, start_index = 0, 1, 0
    while not src.eof:
        raw, _ = src.read_checked()
        lines = (carry + raw).split(b"\n")
        carry = lines.pop()  # the start of a line that goes on in the next block (at the end: the last line)
        if src.eof and carry:
            lines.append(carry)
        for line in lines:
            if line.strip():
                index += 1
            pos += len(line) + 1
            line_no += 1
            if index - start_index == CHUNK_RECORDS:
                chunks.append(Chunk(fid, str(path), "jsonl", start, pos, start_index, start_line,
                                    first_id + start_index, index - start_index, first_number + len(chunks)))
                start, start_line, start_index = pos, line_no, index
    if index > start_index:
        chunks.append(Chunk(fid, str(path), "jsonl", start, pos + 1, start_index, start_line,
                            first_id + start_index, index - start_index, first_number + len(chunks)))
    if not chunks:
        raise DataError(f"{path}: the file is empty. Expected JSON Lines records (one object per line).")
    h.update(src.digest.hexdigest().encode())
    return chunks


def _json_error(path: Path, err: json.JSONDecodeError, text_before: str, lines_before: int, col_before: int):
    line = lines_before + text_before.count("\n", 0, err.pos) + 1
    last_nl = text_before.rfind("\n", 0, err.pos)
    col = err.pos - last_nl if last_nl >= 0 else col_before + err.pos + 1
    return DataError(f"{path}: invalid JSON at line {line}, column {col}: {err.msg}.")


def _plan_json_list(path: Path, fid: int, first_id: int, first_number: int, h) -> list[Chunk]:
    """Find record boundaries in a JSON list by decoding it element by element, block by block.

    Decoding is the only way to know where an element ends (strings may hold brackets); it is C-speed
    and keeps only a block in memory. Chunk boundaries are kept as byte offsets for the tasks."""
    src = _Text(path)
    decoder = json.JSONDecoder()
    buf = src.read()
    while not buf.strip() and not src.eof:
        buf += src.read()
    if not buf.strip():
        raise DataError(f"{path}: the file is empty. Expected a JSON list of records.")
    pos = _WS.match(buf, 0).end()
    if buf[pos] != "[":
        _not_a_list(path, buf, src)
    pos += 1
    base_bytes = 3 if src.had_bom else 0  # byte offset of buf[0]
    lines_before, col_before = 0, 0
    chunks: list[Chunk] = []
    index = 0
    chunk_start_pos, chunk_start_index = None, 0
    chunk_start_byte, chunk_start_line = 0, 1
    expect_value = True

    def trim(upto: int) -> None:
        """Drop buf[:upto]: everything before the current element."""
        nonlocal buf, base_bytes, lines_before, col_before, pos, chunk_start_pos
        dropped = buf[:upto]
        base_bytes += len(dropped.encode("utf-8"))
        n = dropped.count("\n")
        col_before = len(dropped) - dropped.rfind("\n") - 1 if n else col_before + len(dropped)
        lines_before += n
        buf = buf[upto:]
        pos -= upto

    while True:
        pos = _WS.match(buf, pos).end()
        if pos >= len(buf):
            if src.eof:
                raise _json_error(path, json.JSONDecodeError("Expecting value" if expect_value else
                                                             "Expecting ',' delimiter", buf, pos), buf,
                                  lines_before, col_before)
            buf += src.read()
            continue
        if not expect_value:
            c = buf[pos]
            if c == "]":
                pos += 1
                break
            if c != ",":
                raise _json_error(path, json.JSONDecodeError("Expecting ',' delimiter", buf, pos), buf,
                                  lines_before, col_before)
            pos += 1
            expect_value = True
            continue
        if buf[pos] == "]" and index == 0:
            pos += 1
            break
        if chunk_start_pos is None:
            # The first element of a new chunk: trim the buffer so offsets stay cheap to compute.
            trim(pos)
            chunk_start_pos, chunk_start_index = pos, index
            chunk_start_byte, chunk_start_line = base_bytes, lines_before + 1
        try:
            _, end = decoder.raw_decode(buf, pos)
            cut = end >= len(buf)  # a number or literal may go on in the next block
        except json.JSONDecodeError as err:
            # Only the end of the buffer can cut an element: an unterminated string, or an error right
            # at the end. Anything else is a real syntax error.
            cut = err.msg.startswith("Unterminated string") or err.pos >= len(buf) - 32
            if src.eof or not cut:
                raise _json_error(path, err, buf, lines_before, col_before) from None
        if cut and not src.eof:
            buf += src.read()
            continue
        index += 1
        pos = end
        expect_value = False
        if index - chunk_start_index == CHUNK_RECORDS:
            end_byte = base_bytes + len(buf[:pos].encode("utf-8"))
            chunks.append(Chunk(fid, str(path), "json", chunk_start_byte, end_byte, chunk_start_index,
                                chunk_start_line, first_id + chunk_start_index, CHUNK_RECORDS,
                                first_number + len(chunks)))
            trim(pos)
            chunk_start_pos = None
    if chunk_start_pos is not None and index > chunk_start_index:
        end_byte = base_bytes + len(buf[:pos].encode("utf-8"))
        chunks.append(Chunk(fid, str(path), "json", chunk_start_byte, end_byte, chunk_start_index,
                            chunk_start_line, first_id + chunk_start_index, index - chunk_start_index,
                            first_number + len(chunks)))
    # Nothing but whitespace may follow the list.
    while True:
        pos = _WS.match(buf, pos).end()
        if pos < len(buf):
            raise _json_error(path, json.JSONDecodeError("Extra data", buf, pos), buf, lines_before, col_before)
        if src.eof:
            break
        buf, pos = buf + src.read(), pos
    h.update(src.digest.hexdigest().encode())
    return chunks


def _not_a_list(path: Path, head: str, src: _Text) -> None:
    text = head
    while not src.eof and len(text) < (64 << 20):
        text += src.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not src.eof:
            raise DataError(f"{path}: expected a JSON list of records, found something else.") from None
        raise _json_error(path, err, text, 0, 0) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = f" (it has a list under {lists[0]!r}; pass that list as the file)" if lists else ""
        raise DataError(f"{path}: expected a JSON list of records, found an object{hint}.")
    raise DataError(f"{path}: expected a JSON list of records, found {_describe_value(data)}.")


def _row_chunks(path: Path, kind: str, fid: int, first_id: int, first_number: int, n: int) -> list[Chunk]:
    return [Chunk(fid, str(path), kind, a, min(a + CHUNK_RECORDS, n), a, 0, first_id + a,
                  min(a + CHUNK_RECORDS, n) - a, first_number + k)
            for k, a in enumerate(range(0, n, CHUNK_RECORDS))]


def _plan_parquet(path: Path, fid: int, first_id: int, first_number: int, h) -> list[Chunk]:
    import pyarrow.parquet as pq

    h.update(file_digest(str(path)).encode())
    return _row_chunks(path, "parquet", fid, first_id, first_number, pq.ParquetFile(path).metadata.num_rows)


def _plan_arrow(path: Path, fid: int, first_id: int, first_number: int, h) -> list[Chunk]:
    h.update(file_digest(str(path)).encode())
    return _row_chunks(path, "arrow", fid, first_id, first_number, len(_arrow_table(str(path))))


def _arrow_table(path: str):
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


# -- reading one chunk (in a Ray Data task, or in-process for small data) ---------------------------------

@dataclass
class Item:
    """One record of a chunk, or why it could not be read."""

    id: int
    index: int
    line: int            # 0 where lines mean nothing (Parquet, Arrow)
    record: Any = None
    problem: Problem | None = None


def read_chunk(chunk: Chunk) -> Iterator[Item]:
    if chunk.kind == "jsonl":
        yield from _read_jsonl(chunk)
    elif chunk.kind == "json":
        yield from _read_json_list(chunk)
    else:
        yield from _read_rows(chunk)


def _read_bytes(chunk: Chunk) -> str:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        text = f.read(chunk.end - chunk.start).decode("utf-8")
    return text.removeprefix("\ufeff") if chunk.start == 0 else text


def _read_jsonl(chunk: Chunk) -> Iterator[Item]:
    k = 0
    for n, line in enumerate(_read_bytes(chunk).split("\n")):
        if not line.strip() or k >= chunk.count:
            continue
        line_no = chunk.first_line + n
        item = Item(chunk.first_id + k, chunk.first_index + k, line_no)
        try:
            item.record = json.loads(line)
        except json.JSONDecodeError as err:
            item.problem = Problem(item.index, "<json>", "valid JSON", f"column {err.colno}: {err.msg}", line=line_no)
        k += 1
        yield item


def _read_json_list(chunk: Chunk) -> Iterator[Item]:
    text = _read_bytes(chunk)
    decoder = json.JSONDecoder()
    pos = 0
    line = chunk.first_line
    for k in range(chunk.count):
        start = _WS.match(text, pos).end()
        if text.startswith(",", start):
            start = _WS.match(text, start + 1).end()
        line += text.count("\n", pos, start)
        record, pos = decoder.raw_decode(text, start)
        yield Item(chunk.first_id + k, chunk.first_index + k, line, record)
        line += text.count("\n", start, pos)


def _read_rows(chunk: Chunk) -> Iterator[Item]:
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(chunk.path)
        table = pf.read_row_groups(_row_groups(pf, chunk.start, chunk.end))
        first_row = sum(pf.metadata.row_group(i).num_rows
                        for i in range(_row_groups(pf, chunk.start, chunk.end)[0]))
        rows = table.slice(chunk.start - first_row, chunk.count).to_pylist()
    else:
        rows = _arrow_table(chunk.path).slice(chunk.start, chunk.count).to_pylist()
    for k, rec in enumerate(rows):
        yield Item(chunk.first_id + k, chunk.first_index + k, 0, rec)


def _row_groups(pf, start: int, end: int) -> list[int]:
    out, row = [], 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if row < end and row + n > start:
            out.append(i)
        row += n
    return out
