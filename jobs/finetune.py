"""QLoRA fine-tuning of a ChatGLM-family model on Ray Train, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/finetune.py --base_model THUDM/chatglm2-6b --data_path data.json
    python jobs/finetune.py --dry_run        # validate config and data, print statistics, exit

Recipe: config → data (validated before any worker starts) → Ray Train workers (model + LoRA → loop →
checkpoints) → where the best adapter is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python jobs/finetune.py` from the project root (as `ray job submit` runs it)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import cluster
from common.config import (
    MIN_STEPS_PER_EPOCH,
    ROOMY_TOKENS_PER_BATCH,
    TIGHT_TOKENS_PER_BATCH,
    FinetuneConfig,
    format_config,
    load_config,
    save_config,
    worker_resources,
)
from common.errors import ModelFilesError, UserError, memory_kill, run_cli
from common.metrics import BEST_METRICS
from common.models.loader import ModelInfo, open_model_folder
from common.templates import Template, get_template
from common.tracking import (
    check_reachable,
    default_tracking_uri,
    experiment_id,
    log_dataset,
    mark_model_training,
    retrying,
    source_tags,
)
from common.training.epochs import ParquetExamples, fit_batching
from common.training.examples import length_summary
from common.training.memory import large_data_batching, loss_chunk_for, model_shape
from common.training.objectives import preference_settings
from common.training.tokenize_cache import (
    META_COLUMNS,
    EncodeSpec,
    TokenizedSet,
    conversations,
    pick_eval_ids,
    sample_ids,
    tokenize,
    write_subset,
)
from common.training.worker import layer_activations, train_loop_per_worker


@dataclass
class PreparedData:
    """The validated, tokenized data of a run, and what the workers read."""

    train: TokenizedSet
    eval_set: TokenizedSet | None   # --eval_data_path, when given
    eval_ids: np.ndarray            # held-out ids (of eval_set, or of train when split off it)
    eval_file: str | None           # those examples as one Parquet file (None when validating only)
    info: ModelInfo | None          # None: the model could not be opened (dry run only)
    template: Template | None

    @property
    def worker_data(self) -> dict:
        return {"train_files": self.train.parts, "eval_files": [self.eval_file],
                "exclude_ids_from": self.eval_file if self.eval_set is None else None}


def prepare_data(cfg: FinetuneConfig, start_ray) -> PreparedData:
    """Validate and tokenize (or reuse the cache); raises DataError naming file, record and field."""
    try:
        info = open_model_folder(cfg.base_model, revision=cfg.revision, cache_dir=cfg.cache_dir,
                                 local_files_only=cfg.local_files_only)
        template = get_template(cfg.template or info.template)
    except ModelFilesError as err:
        if not cfg.dry_run:
            raise
        print(f"  token statistics skipped: {err}")
        info = template = None
    spec = EncodeSpec(str(info.path) if info else None, template.name if template else "-", cfg.max_source_length,
                      cfg.max_target_length, cfg.train_on_history, cfg.trust_remote_code, pairs=cfg.stage == "dpo")
    cache_root = cfg.data_cache_dir or str(Path(cfg.output_dir) / "data_cache")
    train = tokenize(cfg.data_path, spec, cache_root, start_ray=start_ray)
    train.check(cfg.skip_invalid_records)
    eval_set = None
    if cfg.eval_data_path:
        eval_set = tokenize(cfg.eval_data_path, spec, cache_root, start_ray=start_ray)
        eval_set.check(cfg.skip_invalid_records)
    if info is None:
        return PreparedData(train, eval_set, np.zeros(0, np.int64), None, None, None)
    source = eval_set or train
    ids = source.read_columns(["id"])["id"].to_numpy()
    if eval_set:
        eval_ids = sample_ids(ids, min(len(ids), cfg.max_eval_samples), cfg.seed)
    else:
        eval_ids = pick_eval_ids(ids, cfg.eval_ratio, cfg.seed, cfg.max_eval_samples)
    eval_file = write_subset(source, eval_ids, "eval") if len(eval_ids) else None
    return PreparedData(train, eval_set, eval_ids, eval_file, info, template)


def print_data_report(cfg: FinetuneConfig, data: PreparedData) -> None:
    m = data.train.manifest
    n_eval = len(data.eval_ids)
    print(f"data: {data.train.spec_text}  (content hash {data.train.content_hash}"
          + (", from the cache)" if data.train.from_cache else ")"))
    if data.info is None:
        print(f"  records: {m['valid']} valid, {m['invalid']} skipped")
    for why, n in sorted(m["reasons"].items(), key=lambda kv: -kv[1]):
        print(f"  skipped because {why}: {n}")
    if data.info is None:
        return
    meta = data.train.read_columns(META_COLUMNS)
    every = {k: meta[k].to_numpy() for k in META_COLUMNS}
    train = ~np.isin(every["id"], data.eval_ids) if data.eval_set is None else np.ones(len(every["id"]), bool)
    cols = {k: v[train] for k, v in every.items()}
    multi = int(every["multi_turn"].sum())
    n_train = len(cols["id"])
    print(f"  records: {m['valid']} valid, {m['invalid']} skipped; train {n_train}, eval {n_eval}; "
          f"multi-turn {multi} ({100 * multi / max(m['examples'], 1):.0f}%)")
    lengths = cols["num_tokens"]
    print(f"  model: {data.info.name} ({data.info.layout} layout, family {data.info.family}, "
          f"template {data.template.name})")
    unit = "preference pair (chosen + rejected)" if cfg.stage == "dpo" else "example"
    print(f"  train tokens: {int(lengths.sum())} ({int(cols['num_targets'].sum())} supervised); "
          f"per {unit}: {length_summary(lengths)}")
    rejected = m["too_long"]
    print(f"  truncation (prompt <= {cfg.max_source_length}, answer <= {cfg.max_target_length}): "
          f"{int(cols['dropped_rounds'].sum())} history round(s) dropped, {int(cols['answer_truncated'].sum())} "
          f"answer(s) cut, {rejected} record(s) rejected as too long"
          + (f" (records {m['too_long_ids']})" if rejected else ""))


AUTO_SETTINGS = ("max_tokens_per_batch", "gradient_accumulation_steps", "warmup_steps", "logging_steps")


BATCHING = ("max_tokens_per_batch", "gradient_accumulation_steps")


def fit_to_data(cfg: FinetuneConfig, data: PreparedData, gpu_bytes: int | None = None,
                resumed: dict | None = None) -> tuple[FinetuneConfig, list[str]]:
    """Choose the settings left unset for this data; the ones given stay. Returns the resolved config and
    the names it chose. Prints one line when it did, and how an epoch divides into optimizer steps
    (computed exactly as the workers will).

    `gpu_bytes`: what one worker's GPU may hold (None on CPU); a card with room gets longer rows.
    `resumed`: the batching of the checkpoint a run resumes from, which it keeps (the epoch plan, and so
    where the run stopped in it, depends on it), whatever card it resumes on."""
    import torch

    packing = cfg.packing
    src = ParquetExamples(data.train.parts, exclude=data.eval_ids if data.eval_set is None else None)
    # Longer rows only where rows are packed: padded batches (--packing false) hold a number of examples instead.
    shape = model_shape(data.info.path)
    large_tokens, large_accumulation = large_data_batching(
        shape, cfg.bits, gpu_bytes if packing else None, loss_chunk_for(shape),
        layer_activations(cfg, data.info.family, torch.device("cuda")))  # gpu_bytes: the workers train on GPUs
    for name in BATCHING:
        if getattr(cfg, name) is None and (resumed or {}).get(name):
            cfg = dataclasses.replace(cfg, **{name: int(resumed[name])})
    large_tokens = max(large_tokens, (cfg.max_source_length + cfg.max_target_length) * (2 if cfg.stage == "dpo" else 1))
    fit = fit_batching(src, packing=packing, workers=cfg.num_workers, batch_size=cfg.per_device_train_batch_size,
                       seed=cfg.seed, max_tokens=cfg.max_tokens_per_batch,
                       accumulation=cfg.gradient_accumulation_steps, large_tokens=large_tokens,
                       large_accumulation=large_accumulation, min_steps=MIN_STEPS_PER_EPOCH)
    per_step = cfg.num_workers * fit.accumulation
    if cfg.gradient_accumulation_steps and len(fit.plan) < per_step:
        raise UserError(f"the training data makes {len(fit.plan)} micro-batch(es) per epoch, but one optimizer step "
                        f"takes {per_step} (--num_workers {cfg.num_workers} x --gradient_accumulation_steps "
                        f"{fit.accumulation}). Lower --gradient_accumulation_steps"
                        + (" or --max_tokens_per_batch" if packing else "") + ", or leave them unset: glmops then "
                        "fits them to the data.")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * fit.steps_per_epoch)
    chosen = {k: v for k, v in {
        "max_tokens_per_batch": fit.max_tokens, "gradient_accumulation_steps": fit.accumulation,
        "warmup_steps": math.ceil(cfg.warmup_ratio * total), "logging_steps": min(50, max(1, total // 10)),
    }.items() if getattr(cfg, k) is None}
    if chosen:
        why = ""
        if {"max_tokens_per_batch", "gradient_accumulation_steps"} & set(chosen):
            shrank = (fit.max_tokens, fit.accumulation) != (cfg.max_tokens_per_batch or large_tokens,
                                                           cfg.gradient_accumulation_steps or large_accumulation)
            card = (f" for {gpu_bytes / 2**30:.0f} GiB per worker" if gpu_bytes else "")
            roomy = (f": {large_tokens}-token rows fit it without recomputing a layer"
                     if large_tokens >= ROOMY_TOKENS_PER_BATCH else
                     f": {large_tokens}-token rows recompute fewer layers there, which is faster"
                     if large_tokens <= TIGHT_TOKENS_PER_BATCH else "")
            why = (f" (the large-data {large_tokens} tokens x {large_accumulation} would make fewer than "
                   f"{MIN_STEPS_PER_EPOCH} optimizer steps per epoch)") if shrank else \
                f" (the large-data defaults{card}{roomy})"
        print("auto settings for this data: " + ", ".join(f"--{k} {v}" for k, v in chosen.items()) + why
              + f"; warm-up is {cfg.warmup_ratio:.0%} of {total} steps. Set a flag to choose it yourself.")
    cfg = dataclasses.replace(cfg, **chosen)
    unit = f"rows of <= {cfg.max_tokens_per_batch} tokens" if packing else \
        f"batches of {cfg.per_device_train_batch_size}"
    print(f"  an epoch: {len(fit.plan):,} micro-batches ({unit}) -> {fit.steps_per_epoch:,} optimizer step(s) of "
          f"up to {per_step} micro-batches ({cfg.num_workers} worker(s) x {cfg.gradient_accumulation_steps}); "
          f"{total:,} steps in all")
    return cfg, list(chosen)


def worker_gpu_bytes(cfg: FinetuneConfig) -> int | None:
    """GPU memory one training worker may use: a GPU of the cluster (read by a one-GPU task) capped by
    --gpu_memory_gib; None where the workers train on CPU, or no GPU answered within two minutes."""
    import ray

    if cfg.use_gpu is False:
        return None
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        import torch

        if not torch.cuda.is_available():  # a local cluster on a machine without GPUs: no Ray needed to say so
            return None
    init_ray(cfg)
    if not ray.cluster_resources().get("GPU"):
        return None
    try:
        total = ray.get(ray.remote(num_gpus=1)(_gpu_total_memory).remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        print("  no GPU of the cluster answered within 2 minutes: batching as for an unknown card")
        return None
    return min(total, int(cfg.gpu_memory_gib * 2**30)) if cfg.gpu_memory_gib else total


def _gpu_total_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def init_ray(cfg: FinetuneConfig) -> int:
    """Connect once: the cluster in RAY_ADDRESS (as `ray job submit` sets it; common/cluster.py), else a
    local one on loopback. Returns the cluster's CPUs (the data pipeline's parallelism)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on 127.0.0.1
        if os.environ.get("RAY_ADDRESS"):
            cluster.join(os.environ["RAY_ADDRESS"])
        else:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def connect_ray(cfg: FinetuneConfig):
    """Ray, checked against what the training workers need."""
    import ray

    init_ray(cfg)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu and gpus < cfg.num_workers:
        raise UserError(f"--num_workers {cfg.num_workers} needs {cfg.num_workers} GPUs; the cluster has {gpus}. "
                        "Lower --num_workers or add GPU nodes.")
    for name, amount in worker_resources(cfg.resources_per_worker).items():
        if cfg.num_workers * amount > resources.get(name, 0):
            raise UserError(f"--resources_per_worker asks {amount:g} {name!r} per worker for {cfg.num_workers} workers; "
                            f"the cluster has {resources.get(name, 0):g}. Start nodes with "
                            f"`ray start --resources '{{\"{name}\": ...}}'` or change the flag.")
    cpus = resources.get("CPU", 0)
    if cfg.num_workers * cfg.cpus_per_worker > cpus:
        raise UserError(f"--num_workers {cfg.num_workers} x --cpus_per_worker {cfg.cpus_per_worker} needs "
                        f"{cfg.num_workers * cfg.cpus_per_worker:g} CPUs; the cluster has {cpus:g}. "
                        "Lower one of them.")
    return use_gpu


def start_mlflow_run(cfg: FinetuneConfig, uri: str, run_name: str, tags: dict, resume_run_id: str | None,
                     data: PreparedData) -> str:
    """The run every worker's rank 0 writes to; created (or reopened on resume) by the driver, with where it
    came from: source and commit, the datasets it trains and evaluates on, every resolved setting."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    exp_id = experiment_id(client, cfg.experiment_name, uri)
    mark_model_training(client, exp_id)
    run = client.create_run(exp_id, run_name=run_name, tags={**source_tags("jobs/finetune.py"), **tags})
    rid = run.info.run_id
    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in asdict(cfg).items()}
    client.log_batch(rid, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    m = data.train.manifest
    log_dataset(client, rid, name=data_name(cfg.data_path), source=cfg.data_path, digest=data.train.content_hash,
                profile={"num_rows": m["valid"], "skipped_records": m["invalid"], "examples": m["examples"],
                         "held_out_for_eval": 0 if data.eval_set else len(data.eval_ids)}, context="training")
    if data.eval_set:
        log_dataset(client, rid, name=data_name(cfg.eval_data_path), source=cfg.eval_data_path,
                    digest=data.eval_set.content_hash,
                    profile={"num_rows": data.eval_set.manifest["valid"], "evaluated": len(data.eval_ids)},
                    context="eval")
    else:  # the held-out split: its own digest, from the data and the records chosen
        split = hashlib.sha256(data.train.content_hash.encode() + np.sort(data.eval_ids).tobytes()).hexdigest()[:16]
        log_dataset(client, rid, name=f"{data_name(cfg.data_path)} (held out)", source=cfg.data_path, digest=split,
                    profile={"num_rows": len(data.eval_ids), "eval_ratio": cfg.eval_ratio}, context="eval")
    return rid


def start_from_adapter(cfg: FinetuneConfig, info: ModelInfo) -> FinetuneConfig:
    """--init_adapter resolved to a local folder (workers load it from there), checked against the base, its LoRA
    settings taking the place of --lora_*."""
    from common.merging import adapter_from

    source = adapter_from(cfg.init_adapter, default_tracking_uri(cfg.mlflow_tracking_uri))
    trained_on = str(source.metadata.get("base_model", ""))
    same = trained_on == info.name or (Path(trained_on).is_dir() and Path(info.path).is_dir()
                                       and Path(trained_on).resolve() == Path(info.path).resolve())
    if not same:
        raise UserError(f"--init_adapter {cfg.init_adapter}: trained on {trained_on or 'an unknown base'}, not on "
                        f"--base_model {cfg.base_model}. Pass the base it was trained on.")
    lora = json.loads((source.path / "adapter_config.json").read_text(encoding="utf-8"))
    targets = lora["target_modules"] if isinstance(lora["target_modules"], str) else sorted(lora["target_modules"])
    print(f"starting from the adapter {source.describe()}: LoRA r={lora['r']}, alpha {lora['lora_alpha']}, "
          f"targets {targets}" + (" (also the reference policy)" if cfg.stage == "dpo" else ""))
    return dataclasses.replace(cfg, init_adapter=str(source.path.resolve()), lora_r=int(lora["r"]),
                               lora_alpha=float(lora["lora_alpha"]),
                               lora_target=[targets] if isinstance(targets, str) else list(targets))


def data_name(path: str) -> str:
    first = path.split(",")[0]
    return Path(first).name if Path(first).exists() else first


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(FinetuneConfig, argv, prog="finetune.py", description=__doc__.splitlines()[0])
    data = prepare_data(cfg, start_ray=lambda: init_ray(cfg))
    print_data_report(cfg, data)
    auto: list[str] = []
    resume_meta = read_checkpoint_metadata(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else {}
    given_init = cfg.init_adapter
    if cfg.init_adapter and data.info is not None:
        cfg = start_from_adapter(cfg, data.info)
    if data.info is not None:
        resumed = resume_meta.get("batching") or {}
        # The card only matters for batching left to choose (a resumed run keeps its checkpoint's).
        settled = all(getattr(cfg, k) or resumed.get(k) for k in BATCHING)
        gpu_bytes = None if settled else worker_gpu_bytes(cfg)
        cfg, auto = fit_to_data(cfg, data, gpu_bytes, resumed)
    print("config:\n" + "\n".join("  " + line for line in format_config(cfg).splitlines()))
    if cfg.dry_run:
        print("dry run: config and data are valid; nothing was trained.")
        return 0
    info, template = data.info, data.template
    if data.eval_file is None:
        raise UserError("no eval examples: the best checkpoint is chosen by eval loss. Set --eval_ratio > 0 "
                        "or pass --eval_data_path.")
    uri = default_tracking_uri(cfg.mlflow_tracking_uri)
    check_reachable(uri)
    dataset_hash = data.train.content_hash
    run_name = cfg.run_name or resume_meta.get("ray_run_name") or time.strftime("finetune-%Y%m%d-%H%M%S")
    storage = str(Path(cfg.output_dir).resolve())
    use_gpu = connect_ray(cfg)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tags = {"base_model": str(Path(info.name).resolve()) if Path(info.name).is_dir() else info.name, "base_revision": str(info.revision), "family": info.family,
            "template": template.name, "dataset_hash": dataset_hash, "dataset_size": str(data.train.manifest["valid"]),
            "ray_run_name": run_name, "glmops.job": "finetune", "glmops.stage": cfg.stage,
            "glmops.auto_settings": ",".join(auto) or "none"}
    run_id = start_mlflow_run(cfg, uri, run_name, tags, resume_meta.get("mlflow_run_id"), data)
    cfg_dict = asdict(cfg)
    if Path(cfg.base_model).expanduser().is_dir():
        # Workers run in Ray's session folders, and the merge job anywhere: pass local paths absolute.
        cfg_dict["base_model"] = base_name = str(Path(cfg.base_model).expanduser().resolve())
    else:
        base_name = info.name
    metadata = {"base_model": base_name, "revision": info.revision, "family": info.family,
                "template": template.name, "bits": cfg.bits, "dataset_hash": dataset_hash,
                "mlflow_run_id": run_id, "ray_run_name": run_name,
                "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                         "target": cfg.lora_target},
                "batching": {name: getattr(cfg, name) for name in BATCHING}, "stage": cfg.stage,
                "init_adapter": given_init}
    if cfg.stage == "dpo":
        metadata["preference"] = asdict(preference_settings(cfg))
    # The held-out conversations replied to at every eval travel with every checkpoint too: the merge job
    # checks its merge on the first few prompts and scores the merged model on all of them.
    generate = conversations(data.eval_file, cfg.eval_generate_samples)
    metadata["eval_prompts"] = [{k: v for k, v in c.items() if k != "answer"} for c in conversations(data.eval_file, 4)]
    metadata["eval_conversations"] = generate
    metadata["eval_max_new_tokens"] = cfg.eval_max_new_tokens
    best_key, best_order = BEST_METRICS[cfg.best_metric]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg_dict, "data": data.worker_data, "tracking_uri": uri, "mlflow_run_id": run_id,
                           "metadata": metadata, "generate_conversations": generate,
                           "resume_from": str(Path(cfg.resume_from_checkpoint).resolve())
                           if cfg.resume_from_checkpoint else None},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                                             **worker_resources(cfg.resources_per_worker)}),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit, checkpoint_score_attribute=best_key,
                                               checkpoint_score_order=best_order),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    save_config(cfg, Path(storage) / run_name / "config.yaml")  # next to the checkpoints
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - recorded in MLflow, then shown as one message
        finish_mlflow_run(uri, run_id, "FAILED")
        raise UserError(failure_message(err, cfg) + f"\nCheckpoints so far are in {storage}/{run_name}; "
                        "continue with --resume_from_checkpoint.") from None
    best = result.get_best_checkpoint(best_key, best_order)
    summary = result.return_value or {}
    log_final_artifacts(uri, run_id, best, cfg, summary)
    finish_mlflow_run(uri, run_id, "FINISHED")
    print_summary(best, run_id, uri, summary, time.time() - t0)
    return 0


def failure_message(err: Exception, cfg: FinetuneConfig) -> str:
    """One line on why training stopped; a memory kill says how full the node was and what to change."""
    kill = memory_kill(err)
    if kill is None:
        return f"training failed: {type(err).__name__}: {str(err).splitlines()[0][:500]}"
    packing = f", a smaller --max_tokens_per_batch (now {cfg.max_tokens_per_batch})" if cfg.packing else ""
    return (f"training failed: Ray killed a process of this job because node {kill.node} ran out of memory "
            f"({kill.used_gb:.2f} GB used of its {kill.limit_gb:.2f} GB limit; Ray kills above "
            f"{kill.threshold:.0%}). Use fewer workers per node (--num_workers {cfg.num_workers}){packing}, "
            "or nodes with more memory.")


def read_checkpoint_metadata(path: str) -> dict:
    meta = Path(path) / "adapter" / "glmops.json"
    if not meta.is_file():
        raise UserError(f"--resume_from_checkpoint {path}: not a glmops checkpoint (no adapter/glmops.json).")
    return json.loads(meta.read_text(encoding="utf-8"))


def log_final_artifacts(uri: str, run_id: str, best, cfg: FinetuneConfig, summary: dict) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri=uri)
    retrying("writing config.yaml", lambda: client.log_text(run_id, format_config(cfg), "config.yaml"))
    if best is None:
        return
    with best.as_directory() as d:
        retrying("uploading the best adapter",
                 lambda: client.log_artifacts(run_id, str(Path(d) / "adapter"), "adapter"))
        meta = json.loads((Path(d) / "adapter" / "glmops.json").read_text(encoding="utf-8"))
    step, now = int(meta["step"]), int(time.time() * 1000)
    metrics = [Metric("best_eval_loss", float(meta["eval_loss"]), now, step)]
    metrics += [Metric(f"best_{key}", float(value), now, step)  # the best checkpoint's reply scores
                for key, value in (meta.get("eval_scores") or {}).items()]
    metrics += [Metric(f"summary_{key}", float(summary[key]), now, 0) for key in
                ("wall_seconds", "peak_memory_gib", "tokens_per_second", "train_tokens_per_second")
                if summary.get(key) is not None]
    tags = [RunTag("best_checkpoint", best.path), RunTag("best_metric", cfg.best_metric)]
    retrying("logging the best checkpoint", lambda: client.log_batch(run_id, metrics=metrics, tags=tags))


def finish_mlflow_run(uri: str, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    retrying(f"marking the run {status}", lambda: MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status))


def print_summary(best, run_id: str, uri: str, summary: dict, wall: float) -> None:
    print("\n=== fine-tune finished")
    if best is not None:
        print(f"best adapter:    {best.path}/adapter")
    if summary.get("best_eval_loss") is not None:
        print(f"best eval loss:  {summary['best_eval_loss']:.4f}")
    history = summary.get("history") or []
    for key, name, unit in (("eval_rewards_accuracy", "best reward acc.:", "share of eval pairs whose chosen "
                             "answer gets the higher reward"), ("eval_bleu-4_chars", "best BLEU-4:", "bleu-4_chars, x100"),
                            ("eval_rouge-l_jieba", "best ROUGE-L:", "rouge-l_jieba, x100")):
        seen = [(h[key], h["step"]) for h in history if key in h]
        if seen:
            value, step = max(seen)
            print(f"{name:<16} {value:.2f} at step {step} ({unit})")
    print(f"wall time:       {wall:.0f} s (training loop {summary.get('wall_seconds', 0):.0f} s)")
    if summary.get("tokens_per_second"):
        print(f"throughput:      {summary['tokens_per_second']:,.0f} tokens/s over the loop (evals included)")
    if summary.get("train_tokens_per_second"):
        print(f"training steps:  {summary['train_tokens_per_second']:,.0f} tokens/s (all workers, after warm-up)")
    if summary.get("peak_memory_gib"):
        print(f"peak memory:     {summary['peak_memory_gib']:.2f} GiB per worker")
    print(f"MLflow run id:   {run_id}   (mlflow ui --backend-store-uri {uri})")
    print(f"next:            python jobs/merge.py --run_id {run_id}")


if __name__ == "__main__":
    run_cli(main)
