"""Merge a fine-tuned LoRA adapter into its base model and register the result in MLflow.

    ray job submit --working-dir . -- python jobs/merge.py --run_id <mlflow run id>
    python jobs/merge.py --experiment glmops-finetune          # the best run by eval loss
    python jobs/merge.py --lora_model output/.../checkpoint-000400/adapter --output_dir models/x
    python jobs/merge.py --run_id <id> --adapter_only          # register the adapter alone (a few MB)

Recipe: pick the adapter → read its metadata (base, revision, template) → merge into the 16-bit base →
verify against the unmerged adapter model → save (safetensors) → register a new version + alias.
With --adapter_only: the adapter checked on its base and scored → saved with what it needs → registered
(under <base>-adapter by default, so a merged <base>-finetune version stays what the server loads).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import MergeConfig, format_config, load_config, save_config
from common.errors import run_cli
from common.merging import (
    AdapterSource,
    check_output_dir,
    find_adapter,
    merge_adapter,
    package_adapter,
    register_merged,
    registered_name_for,
)
from common.tracking import check_reachable, default_tracking_uri


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(MergeConfig, argv, prog="merge.py", description=__doc__.splitlines()[0])
    print("config:\n" + "\n".join("  " + line for line in format_config(cfg).splitlines()))
    uri = default_tracking_uri(cfg.mlflow_tracking_uri)
    check_reachable(uri)  # before any work: an unreachable registry must not leave half a result

    source: AdapterSource = find_adapter(cfg, uri)
    meta = source.metadata
    print(f"adapter: {source.describe()}")
    print(f"  base {meta['base_model']} (revision {meta.get('revision')}), family {meta['family']}, "
          f"template {meta['template']}, trained in {meta.get('bits')}-bit, eval loss {meta.get('eval_loss')}")
    suffix = "adapter" if cfg.adapter_only else "finetune"
    out = Path(cfg.output_dir or f"models/{Path(meta['base_model']).name}-{suffix}")
    check_output_dir(out, cfg.overwrite)

    t0 = time.time()
    if cfg.adapter_only:
        report = package_adapter(source, cfg, out)
        save_config(cfg, out / "merge_config.yaml")
        print(f"adapter saved to {out} in {time.time() - t0:.1f} s (base content hash {report['base_hash'][:16]}...)")
        return _register(cfg, uri, out, source, report, meta)
    report = merge_adapter(source, cfg, out)
    save_config(cfg, out / "merge_config.yaml")
    print(f"merged into {out} in {time.time() - t0:.1f} s")
    print(f"  verified: max |logits(merged) - logits(adapter)| = {report['verify_max_abs_diff']:.2e} "
          f"(tolerance {report['verify_tolerance']:.0e}, {report['verify_prompts']} eval prompts, fp32)")
    if report.get("merge_base_comparison"):
        print("  distance to the model as trained (4-bit base + adapter), max |Δlogits| on the eval prompts:")
        for base, diff in report["merge_base_comparison"].items():
            print(f"    merge_base={base:<14} {diff:.4f}")
    return _register(cfg, uri, out, source, report, meta)


def _register(cfg: MergeConfig, uri: str, out: Path, source: AdapterSource, report: dict, meta: dict) -> int:
    print(f"  sample reply: {report['sample_reply'][:120]!r}")
    if report.get("eval_scores"):
        scores = report["eval_scores"]
        print(f"  scored on the run's {len(report['eval_generations']['reply'])} eval conversations: "
              f"BLEU-4 {scores['bleu-4_chars']:.2f} (chars), ROUGE-L {scores['rouge-l_jieba']:.2f} (jieba words), "
              f"exact match {scores['exact_match']:.1f} (x100; tagged eval.* on the version)")

    name = cfg.registered_model or registered_name_for(meta["base_model"], adapter=cfg.adapter_only)
    version = register_merged(uri, out, name, cfg, source, report)
    if cfg.adapter_only:
        print("\n=== adapter registered")
        print(f"adapter:          {out}")
    else:
        print("\n=== merge finished")
        print(f"merged model:     {out}")
    print(f"registered:       {name} version {version.version}, alias @{cfg.alias}")
    if not cfg.adapter_only:
        print(f"serve it:         serve run serving:app model=models:/{name}@{cfg.alias}")
    return 0


if __name__ == "__main__":
    run_cli(main)
