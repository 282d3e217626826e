"""QLoRA fine-tuning of a ChatGLM-family model on Ray Train, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/finetune.py --base_model THUDM/chatglm2-6b --data_path data.json
    python jobs/finetune.py --dry_run        # validate config and data, print statistics, exit

Recipe: config → data (validated before any worker starts) → Ray Train workers (model + LoRA → loop →
checkpoints) → where the best adapter is.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/finetune.py` from the project root (as `ray job submit` runs it)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import FinetuneConfig, format_config, load_config
from common.data import Dataset, content_hash, load_dataset, split
from common.errors import ModelFilesError, UserError, run_cli
from common.examples import encode_records, length_summary
from common.loader import load_tokenizer, open_model_folder
from common.templates import get_template


def prepare_data(cfg: FinetuneConfig) -> tuple[list[dict], list[dict], Dataset]:
    """Validated train and eval records; raises DataError naming file, record and field."""
    ds = load_dataset(cfg.data_path, skip_invalid=cfg.skip_invalid_records)
    if cfg.eval_data_path:
        held = load_dataset(cfg.eval_data_path, skip_invalid=cfg.skip_invalid_records)
        return ds.records, held.records, ds
    train, held = split(ds.records, cfg.eval_ratio, cfg.seed)
    return train, held, ds


def print_data_report(cfg: FinetuneConfig, train: list[dict], held: list[dict], ds: Dataset) -> None:
    multi = sum(1 for r in ds.records if r.get("history"))
    n_skipped = len({p.index for p in ds.skipped})
    print(f"data: {ds.source}  (content hash {content_hash(ds.records)})")
    print(f"  records: {len(ds.records)} valid, {n_skipped} skipped; "
          f"train {len(train)}, eval {len(held)}; multi-turn {multi} ({100 * multi / len(ds.records):.0f}%)")
    if ds.skipped:
        reasons: dict[str, int] = {}
        for p in ds.skipped:
            key = f"{p.field}: expected {p.expected}"
            reasons[key] = reasons.get(key, 0) + 1
        for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  skipped because {why}: {n}")
    try:
        info = open_model_folder(cfg.base_model, revision=cfg.revision, cache_dir=cfg.cache_dir,
                                 local_files_only=cfg.local_files_only)
        tok = load_tokenizer(info, cfg.trust_remote_code)
    except ModelFilesError as err:
        print(f"  token statistics skipped: {err}")
        return
    template = get_template(cfg.template or info.template)
    enc = encode_records(train, tok, template, cfg.max_source_length, cfg.max_target_length, cfg.train_on_history)
    lengths = [len(e.input_ids) for e in enc.examples]
    print(f"  model: {info.name} ({info.layout} layout, family {info.family}, template {template.name})")
    print(f"  train tokens: {enc.num_tokens} ({enc.num_supervised} supervised); per example: {length_summary(lengths)}")
    print(f"  truncation (prompt <= {cfg.max_source_length}, answer <= {cfg.max_target_length}): "
          f"{enc.dropped_rounds} history round(s) dropped, {enc.truncated_answers} answer(s) cut, "
          f"{len(enc.too_long)} record(s) rejected as too long"
          + (f" (records {enc.too_long[:10]})" if enc.too_long else ""))


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(FinetuneConfig, argv, prog="finetune.py", description=__doc__.splitlines()[0])
    print("config:\n" + "\n".join("  " + line for line in format_config(cfg).splitlines()))
    train, held, ds = prepare_data(cfg)
    print_data_report(cfg, train, held, ds)
    if cfg.dry_run:
        print("dry run: config and data are valid; nothing was trained.")
        return 0
    raise UserError("training on Ray is not built yet (issue: jobs/finetune.py); run with --dry_run for now.")


if __name__ == "__main__":
    run_cli(main)
