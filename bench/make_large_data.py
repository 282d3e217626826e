"""Synthetic instruction data at the size users train on, in the seed's format (nothing downloaded).

N records shaped like the alpaca-zh / belle / guanaco sets: a short instruction, an optional input
(30 %), an answer whose length follows a lognormal (median about 120 characters, up to 2,000), and
multi-turn history on 15 % of the records (1-3 earlier rounds). Texts mix common Chinese characters,
punctuation and some English words. Deterministic for a given --seed.

    python bench/make_large_data.py --n 1000000 --out /tmp/large.json            # a JSON list
    python bench/make_large_data.py --n 50000 --out /tmp/large.jsonl --bad 49999  # JSONL, record 49999 broken

`--bad i,j,...` makes those records invalid (an empty `output`), to check that errors deep in a file are
named by index (and, in JSONL, by line).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.make_length_mix_data import CHARS

WORDS = ["Python", "AI", "GPU", "data", "model", "OK", "API", "2024", "Ray", "JSON", "hello", "cloud"]
PUNCT = "，。、；：？！"


def _text(rng: random.Random, n: int) -> str:
    parts = []
    while n > 0:
        k = min(n, rng.randint(6, 24))
        parts.append("".join(rng.choices(CHARS, k=k)))
        parts.append(rng.choice(WORDS) if rng.random() < 0.1 else rng.choice(PUNCT))
        n -= k + 1
    return "".join(parts)


def _length(rng: random.Random, median: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(0, 0.8) * median)))


def make_record(rng: random.Random) -> dict:
    rec = {"instruction": _text(rng, _length(rng, 20, 4, 200)),
           "input": _text(rng, _length(rng, 40, 4, 600)) if rng.random() < 0.3 else "",
           "output": _text(rng, _length(rng, 120, 2, 2000))}
    if rng.random() < 0.15:
        rec["history"] = [[_text(rng, _length(rng, 20, 4, 200)), _text(rng, _length(rng, 80, 2, 800))]
                          for _ in range(rng.randint(1, 3))]
    return rec


def write(path: str | Path, n: int, *, seed: int = 0, bad: set[int] = frozenset(), jsonl: bool | None = None) -> Path:
    """Stream `n` records to `path` (a JSON list, or JSONL when the name ends in .jsonl)."""
    path = Path(path)
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        if not jsonl:
            f.write("[\n")
        for i in range(n):
            rec = make_record(rng)
            if i in bad:
                rec["output"] = ""
            line = json.dumps(rec, ensure_ascii=False)
            f.write(line + "\n" if jsonl else line + (",\n" if i < n - 1 else "\n"))
        if not jsonl:
            f.write("]\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True, help="number of records")
    ap.add_argument("--out", required=True, help="output file (.json: a JSON list, .jsonl: one record per line)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad", default="", help="comma-separated record indices to make invalid")
    args = ap.parse_args()
    t0 = time.time()
    bad = {int(x) for x in args.bad.split(",") if x.strip()}
    path = write(args.out, args.n, seed=args.seed, bad=bad)
    print(f"wrote {args.n:,} records ({path.stat().st_size / 2**20:,.0f} MiB) to {path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
