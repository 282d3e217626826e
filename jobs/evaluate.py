"""Score models by generation (BLEU-4, ROUGE-1/2/L, exact match) on a data file, as an MLflow run.

    python jobs/evaluate.py --model models:/tiny-chatglm2-finetune@champion --data_path data/sample.json
    python jobs/evaluate.py --compare models/tiny-chatglm2,models:/tiny-chatglm2-finetune@champion
    python jobs/evaluate.py --model <training run id>       # its best adapter on its base, not merged
    python jobs/evaluate.py --via_url http://127.0.0.1:8000  # a running server, through its OpenAI API
    python jobs/evaluate.py --via_url http://127.0.0.1:8000 --compare base,exp7,runs:/<run_id>  # served adapters

Recipe: config → records (validated as training data is) → each model: load, greedy replies, scores →
one table printed and one MLflow run (metrics, the per-example table, scores tagged on registry versions).
Metric definitions: common/metrics.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import EvaluateConfig, load_config
from common.errors import run_cli
from common.evaluation import (
    format_scores,
    load_conversations,
    log_evaluation,
    open_candidate,
    score_candidate,
    server_candidate,
)
from common.tracking import check_reachable, default_tracking_uri, source_tags


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(EvaluateConfig, argv, prog="evaluate.py", description=__doc__.splitlines()[0])
    uri = default_tracking_uri(cfg.mlflow_tracking_uri)
    check_reachable(uri)
    convs = load_conversations(cfg.data_path, cfg.max_samples)
    print(f"data: {cfg.data_path}, {len(convs)} records (greedy replies of up to {cfg.max_new_tokens} tokens)")

    results = []
    if cfg.via_url:  # the server's base, or the models it serves named by --model / --compare
        api_key = cfg.api_key or os.environ.get("GLMOPS_API_KEY")
        for name in cfg.models or [None]:
            results.append(score_candidate(server_candidate(cfg.via_url, api_key, cfg, name), convs))
    for spec in [] if cfg.via_url else cfg.models:  # one at a time: a model is freed before the next one loads
        print(f"model: {spec}")
        results.append(score_candidate(open_candidate(spec, cfg, uri), convs))

    run_id = log_evaluation(uri, cfg, results, convs, source_tags("jobs/evaluate.py"))
    print("\n=== scores (x100, mean over records; bleu-4 over characters, rouge over jieba words)")
    print(format_scores(results))
    print(f"\nMLflow run id:   {run_id}   (per-example replies: the run's Evaluation / Artifacts tab)")
    return 0


if __name__ == "__main__":
    run_cli(main)
