"""Merging an adapter into its base: find the adapter, merge, verify, save, register.

`--adapter_only` registers the adapter instead of a merged copy (`package_adapter`): its safetensors, and in
glmops.json the base it was trained on (id or folder, and a content hash of the base's weights), family,
template, the bits it was trained in and its LoRA config; scored on the run's eval conversations like a merge.

Exactness: the merge is checked in float32 against the unmerged adapter model on the eval prompts that
travel with the adapter (tolerance MERGE_TOLERANCE of the largest |logit|, at least MERGE_TOLERANCE: float32
rounding of W + BA against W x + B(A x) grows with the logits' size; a wrong merge is off by whole units). When the adapter was trained on a 4-bit
base, both merge bases are compared with the model as trained:
  original       the original 16-bit weights (the usual choice; differs by the base's NF4 rounding)
  nf4_roundtrip  the base quantized to NF4 and back, as training saw it (closest to the trained model)
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.data import Conversation
from common.errors import ModelFilesError, UserError
from common.models.metadata import METADATA_FILE

MERGE_TOLERANCE = 1e-4  # max |Δlogits| merged vs unmerged, float32, relative to the largest |logit| (>= 1)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FALLBACK_PROMPTS = [{"history": [], "query": "你好"}, {"history": [], "query": "Hello, who are you?"}]


@dataclass
class AdapterSource:
    path: Path
    metadata: dict[str, Any]
    training_run_id: str | None
    origin: str

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def _adapter_folder(path: Path) -> Path | None:
    for p in (path, path / "adapter", path / "adapter_model"):
        if (p / "adapter_config.json").is_file():
            return p
    return None


def _read_adapter(folder: Path, origin: str, run_id: str | None) -> AdapterSource:
    meta_path = folder / METADATA_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    else:  # a plain PEFT adapter (the seed's): the base comes from adapter_config.json
        acfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if not acfg.get("base_model_name_or_path"):
            raise UserError(f"{folder}: no glmops.json and no base_model_name_or_path in adapter_config.json; "
                            "cannot tell which base model this adapter belongs to.")
        meta = {"base_model": acfg["base_model_name_or_path"], "revision": acfg.get("revision")}
    return AdapterSource(folder, meta, run_id or meta.get("mlflow_run_id"), origin)


def find_adapter(cfg, uri: str) -> AdapterSource:
    """The adapter chosen by --lora_model, --run_id or --experiment."""
    if cfg.lora_model:
        folder = _adapter_folder(Path(cfg.lora_model))
        if folder is None:
            raise UserError(f"--lora_model {cfg.lora_model}: no adapter_config.json there (or in adapter/, "
                            "adapter_model/). Pass the adapter folder of a checkpoint.")
        return _read_adapter(folder, "adapter folder", None)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if cfg.experiment:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise UserError(f"--experiment {cfg.experiment}: no such MLflow experiment at {uri}.")
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["metrics.best_eval_loss ASC"], max_results=50)
        runs = [r for r in runs if "best_eval_loss" in r.data.metrics]
        if not runs:
            raise UserError(f"--experiment {cfg.experiment}: no finished fine-tune run with an eval loss.")
        run_id, origin = runs[0].info.run_id, f"best run of experiment {cfg.experiment}"
    else:
        run_id, origin = cfg.run_id, "run"
    return adapter_of_run(run_id, uri, origin)


def adapter_from(spec: str, uri: str) -> AdapterSource:
    """An adapter named as users name one: `runs:/<run id>` (its best adapter), `models:/<name>/<version>` or
    `models:/<name>@<alias>` (an adapter-only registry version), or a folder. UserError when it is none of them."""
    from common.registry import download_version, is_adapter_folder

    if spec.startswith("runs:/"):
        return adapter_of_run(spec.removeprefix("runs:/").strip("/"), uri, "run")
    if spec.startswith("models:/"):
        folder, name, version = download_version(spec, uri)
        if not is_adapter_folder(folder):
            raise UserError(f"{spec}: version {version} of {name} is a whole model, not an adapter; register the "
                            "run with `jobs/merge.py --adapter_only`, or pass runs:/<run id>.")
        return _read_adapter(folder, f"{name} version {version}", None)
    folder = _adapter_folder(Path(spec).expanduser())
    if folder is None:
        raise UserError(f"{spec}: no adapter_config.json there (or in adapter/, adapter_model/); pass an adapter "
                        "folder, runs:/<run id> or models:/<name>/<version>.")
    return _read_adapter(folder, "adapter folder", None)


def adapter_of_run(run_id: str, uri: str, origin: str = "run", dst: Path | None = None) -> AdapterSource:
    """A run's best adapter: its best checkpoint's folder when this machine has it, else the run's `adapter`
    artifact downloaded (into `dst`, or a temporary folder). UserError for an unknown run or one without."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--run_id {run_id}: no such run at {uri}.") from None
    local = run.data.tags.get("best_checkpoint")
    if local and _adapter_folder(Path(local)):
        return _read_adapter(_adapter_folder(Path(local)), f"{origin} {run_id}, best checkpoint", run_id)
    names = [a.path for a in client.list_artifacts(run_id)]
    if "adapter" not in names:
        raise UserError(f"run {run_id} has no adapter artifact (artifacts: {names or 'none'}); it did not finish "
                        "a checkpoint. Pick another run or pass --lora_model.")
    if dst is None:
        dst = Path(tempfile.mkdtemp(prefix="glmops-adapter-"))
    folder = dst / "adapter"
    if not (folder / "adapter_config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", dst_path=str(dst),
                                                          tracking_uri=uri))
    return _read_adapter(folder, f"{origin} {run_id}, downloaded", run_id)


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--output_dir {out} exists and is not empty; pass --overwrite to replace it "
                            "(registered versions are never touched).")
        shutil.rmtree(out)


def registered_name_for(base_model: str, adapter: bool = False) -> str:
    return f"{Path(base_model.rstrip('/')).name}-{'adapter' if adapter else 'finetune'}"


def _prompt_ids(tok, template, prompts: list[dict]) -> list[list[int]]:
    return [template.prompt(tok, Conversation.from_dict(p)) for p in prompts]


@torch.no_grad()
def _logits(model, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0].float().cpu()
            for ids in prompt_ids]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _open_base(source: AdapterSource, cfg):
    """The adapter's base model folder, its tokenizer and template (the family and template noted in `meta`)."""
    from common.models.loader import load_tokenizer, open_model_folder
    from common.templates import get_template

    meta = source.metadata
    try:
        info = open_model_folder(meta["base_model"], revision=meta.get("revision"),
                                 local_files_only=cfg.local_files_only)
    except ModelFilesError as err:
        raise UserError(f"the adapter's base model cannot be found: {err}") from None
    meta.setdefault("family", info.family)
    meta.setdefault("template", info.template)
    return info, load_tokenizer(info, cfg.trust_remote_code), get_template(meta["template"])


def _score(model, tok, template, meta: dict, device, report: dict) -> None:
    """A sample reply, and the run's eval conversations replied to and scored (the version's eval tags)."""
    from common.generation import generate_replies, generations_table, sample_reply
    from common.metrics import average, score
    from common.tool_eval import reference_text, scored_texts

    prompts = meta.get("eval_prompts") or FALLBACK_PROMPTS
    report["sample_reply"] = sample_reply(model, tok, template.name, Conversation.from_dict(prompts[0]), device)
    convs = [Conversation.from_dict(c) for c in meta.get("eval_conversations") or []]
    if convs:
        raw = generate_replies(model, tok, template.name, convs, device, int(meta.get("eval_max_new_tokens", 128)),
                               raw=True)
        replies = scored_texts(template.name, convs, raw)
        rows = [score(r, reference_text(c)) for r, c in zip(replies, convs)]
        report["eval_scores"] = average(rows)
        report["eval_generations"] = generations_table(convs, replies, rows)


WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def weight_files(folder: Path) -> list[Path]:
    """A model folder's config and weight files, in name order (what `content_hash` reads)."""
    return sorted({p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern) if p.is_file()})


def content_hash(folder: Path) -> str:
    """sha256 over a model folder's config and weight files (names and bytes, in name order): which base an
    adapter needs, whatever the folder or hub id it is reached by."""
    h = hashlib.sha256()
    for path in weight_files(folder):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def package_adapter(source: AdapterSource, cfg, out: Path) -> dict[str, Any]:
    """The adapter alone, ready to go on its base: loaded on the base (fp32) to check it applies and to score it,
    saved as safetensors with glmops.json saying what it needs. Returns the report logged with it."""
    from peft import PeftModel

    from common.models.loader import load_model
    from common.models.metadata import write_model_metadata

    meta = source.metadata
    info, tok, template = _open_base(source, cfg)
    base_hash = content_hash(info.path)
    model = PeftModel.from_pretrained(load_model(info, bits=16, dtype=torch.float32, device=cfg.device,
                                                 trust_remote_code=cfg.trust_remote_code), source.path).eval()
    report: dict[str, Any] = {}
    _score(model, tok, template, meta, cfg.device, report)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    lora = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    lineage = {"training_run_id": source.training_run_id, "dataset_hash": meta.get("dataset_hash"),
               "eval_loss": meta.get("eval_loss"), "adapter": str(source.path), "adapter_origin": source.origin,
               "trained_bits": meta.get("bits"), "packaged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_model_metadata(out, family=meta["family"], template=template.name, base_model=meta["base_model"],
                         revision=meta.get("revision"),
                         extra={"kind": "adapter", "base_hash": base_hash, "bits": meta.get("bits"),
                                "lora": {k: lora.get(k) for k in ("r", "lora_alpha", "lora_dropout",
                                                                  "target_modules")},
                                "lineage": lineage})
    report.update(lineage=lineage, base_hash=base_hash)
    return report


def merge_adapter(source: AdapterSource, cfg, out: Path) -> dict[str, Any]:
    """Merge, verify and save; returns the report logged with the model."""
    from peft import PeftModel

    from common.models.convert import _route_autotokenizer_to_ours
    from common.models.loader import load_model
    from common.models.metadata import write_model_metadata

    meta = source.metadata
    info, tok, template = _open_base(source, cfg)
    prompts = meta.get("eval_prompts") or FALLBACK_PROMPTS
    ids = _prompt_ids(tok, template, prompts)
    device = cfg.device

    def load(bits: int):
        return load_model(info, bits=bits, dtype=torch.float32, device=device,
                          trust_remote_code=cfg.trust_remote_code)

    report: dict[str, Any] = {"verify_prompts": len(ids), "verify_tolerance": MERGE_TOLERANCE,
                              "merge_base": cfg.merge_base}
    trained = None
    if meta.get("bits") in (4, 8):
        # The model as trained: quantized base + adapter.
        model = PeftModel.from_pretrained(load(meta["bits"]), source.path).eval()
        trained = _logits(model, ids)
        del model  # drop the caller's reference too: only then can a 6B copy be freed
        gc.collect()

    chosen = None
    comparison: dict[str, float] = {}
    bases = ["original", "nf4_roundtrip"] if trained is not None else ["original"]
    if cfg.merge_base == "nf4_roundtrip" and "nf4_roundtrip" not in bases:
        bases.append("nf4_roundtrip")
    for base_kind in bases:
        if base_kind == "original":
            base = load(16)
        else:
            base = load(4)
            base = base.dequantize()  # NF4 → float: the weights exactly as 4-bit training saw them
            base.config.quantization_config = None
            if hasattr(base, "is_quantized"):
                base.is_quantized = False
            if hasattr(base, "hf_quantizer"):
                base.hf_quantizer = None
        peft_model = PeftModel.from_pretrained(base, source.path).eval()
        unmerged = _logits(peft_model, ids)
        merged = peft_model.merge_and_unload().eval()
        merged_logits = _logits(merged, ids)
        diff = _max_diff(unmerged, merged_logits)
        limit = MERGE_TOLERANCE * max(1.0, max(float(x.abs().max()) for x in unmerged))
        if diff > limit:
            raise UserError(f"merge check failed: merged logits differ from the adapter model's by {diff:.2e} "
                            f"(> {limit:.1e}); nothing was saved or registered.")
        if base_kind == cfg.merge_base:
            report["verify_max_abs_diff"] = diff
        if trained is not None:
            comparison[base_kind] = _max_diff(merged_logits, trained)
        if base_kind == cfg.merge_base:
            chosen = merged
        else:
            del merged, peft_model, base
            gc.collect()
    report["merge_base_comparison"] = comparison
    model = chosen
    _score(model, tok, template, meta, device, report)  # the run's eval replies, now from the merged model

    model = model.to(DTYPES[cfg.dtype])
    model.generation_config.eos_token_id = template.stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)
    if type(tok).__name__ == "ChatGLMTokenizer":
        _route_autotokenizer_to_ours(out)
    lineage = {"training_run_id": source.training_run_id, "dataset_hash": meta.get("dataset_hash"),
               "eval_loss": meta.get("eval_loss"), "adapter": str(source.path), "adapter_origin": source.origin,
               "merge_base": cfg.merge_base, "dtype": cfg.dtype, "trained_bits": meta.get("bits"),
               "stage": meta.get("stage", "sft"), "preference": meta.get("preference"),
               "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_model_metadata(out, family=meta["family"], template=template.name, base_model=meta["base_model"],
                         revision=meta.get("revision"), extra={"lineage": lineage})
    report["lineage"] = lineage
    return report


def register_merged(uri: str, out: Path, name: str, cfg, source: AdapterSource, report: dict):
    """A merge run linked to the training run, the folder as its artifact, a NEW registry version + alias (an
    adapter-only version with --adapter_only: the folder under `adapter`, tagged glmops.kind=adapter)."""
    kind = "adapter" if cfg.adapter_only else "merged"
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    from common.config import to_dict
    from common.tracking import experiment_id, link_model_version, source_tags

    client = MlflowClient(tracking_uri=uri)
    meta = source.metadata
    exp_id = None
    if source.training_run_id:
        try:
            exp_id = client.get_run(source.training_run_id).info.experiment_id
        except MlflowException:
            exp_id = None
    if exp_id is None:
        exp_id = experiment_id(client, "glmops-merge", uri)
    tags = {"glmops.job": "merge", "training_run_id": str(source.training_run_id), "base_model": meta["base_model"],
            "family": meta["family"], "glmops.kind": kind, "glmops.stage": meta.get("stage", "sft")}
    if kind == "merged":
        tags["merge_base"] = cfg.merge_base
    run = client.create_run(exp_id, run_name=f"merge-{name}", tags={**source_tags("jobs/merge.py"), **tags})
    rid = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric("verify_max_abs_diff", report["verify_max_abs_diff"], now, 0)] if kind == "merged" else []
        metrics += [Metric(f"diff_to_trained_{k}", v, now, 0)
                    for k, v in report.get("merge_base_comparison", {}).items()]
        client.log_batch(rid, metrics=metrics,
                         params=[Param(k, str(v)[:6000]) for k, v in to_dict(cfg).items()])
        generations = report.pop("eval_generations", None)
        client.log_text(rid, json.dumps(report, ensure_ascii=False, indent=1, default=str), "merge_report.json")
        if generations:
            client.log_table(rid, data=generations, artifact_file="eval_generations.json")
            client.log_batch(rid, metrics=[Metric(f"eval_{k}", v, now, 0) for k, v in report["eval_scores"].items()])
        client.log_artifacts(rid, str(out), kind)
        try:
            client.create_registered_model(name, description=f"{meta['base_model']} fine-tuned with glmops")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        version_tags = {"training_run_id": str(source.training_run_id), "dataset_hash": str(meta.get("dataset_hash")),
                        "eval_loss": str(meta.get("eval_loss")), "base_model": meta["base_model"],
                        "base_revision": str(meta.get("revision")), "family": meta["family"],
                        "template": meta["template"], "glmops.kind": kind,
                        "glmops.stage": meta.get("stage", "sft")}  # sft, or dpo (with meta["preference"])
        version_tags.update({"merge_base": cfg.merge_base, "dtype": cfg.dtype} if kind == "merged" else
                            {"base_hash": report["base_hash"], "trained_bits": str(meta.get("bits")),
                             "lora_r": str(json.loads((out / "adapter_config.json").read_text())["r"])})
        version_tags.update({f"eval.{k}": f"{v:.2f}" for k, v in (report.get("eval_scores") or {}).items()})
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{kind}", run_id=rid,
                                              tags=version_tags)
        client.set_registered_model_alias(name, cfg.alias, version.version)
        if source.training_run_id:
            try:
                link_model_version(client, source.training_run_id, name, version.version, cfg.alias, rid, exp_id)
            except MlflowException:  # the training run lives in another store: the version still names it
                pass
        client.set_terminated(rid, "FINISHED")
        return version
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
