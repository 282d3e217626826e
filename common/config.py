"""Typed job configs: defaults < YAML file (`--config`) < command-line flags, validated up front.

Each job has one dataclass whose fields carry their own help text. The seed project's flag
spellings stay accepted (`--output_path` for `--output_dir`, `--fp16 True`, ...). Every problem
(unknown key, bad type, bad value) is collected and reported in one `ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

# The embedded default: a tiny offline model written by `make tiny-model` and our sample data.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_MODEL = "models/tiny-chatglm2"
DEFAULT_DATA_PATH = "data/sample.json"

# Batching for large data (fast on a GPU: 8192-token rows x 8 micro-batches per step). Left unset, the
# fine-tune job shrinks both until an epoch holds MIN_STEPS_PER_EPOCH optimizer steps (common/training/epochs.py).
LARGE_DATA_TOKENS_PER_BATCH = 8192
LARGE_DATA_ACCUMULATION = 8
# On a card that holds rows twice as long without recomputing any layer, the job takes them, half as many
# per step (the same tokens per step): each micro-batch has a fixed cost, so fewer, longer ones are faster
# (bench/NOTES.md: 1.09x on an H200).
ROOMY_TOKENS_PER_BATCH = 16384
# On a card where 8192-token rows must recompute many layers, rows half as long (twice as many per step) may
# need far fewer: the job takes them where its cost model says the step is faster (common/training/memory.py).
TIGHT_TOKENS_PER_BATCH = 4096
MIN_STEPS_PER_EPOCH = 10


def opt(default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: tuple[Any, ...] | None = None):
    """A config field with help text, extra flag spellings and optional allowed values."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "aliases": aliases, "choices": choices}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none"}


def _convert(value: Any, tp: Any) -> Any:
    """Convert a YAML value or a flag string to the annotated type; raise ValueError on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "", "auto")):
            return None  # `auto` spells "not set: glmops chooses" in YAML and on the command line
        return _convert(value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, found {value!r}")
        return [_convert(v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(f"expected true or false, found {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, found {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected an integer, found {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, found {value!r}")
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a number, found {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, found {value!r}")
        return str(value)
    return value


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field (and its aliases); values stay raw strings."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    for f, tp in _fields(cls):
        meta = f.metadata
        names = [f"--{f.name}"] + [f"--{a}" for a in meta.get("aliases", ())]
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" (one of: {', '.join(map(str, meta['choices']))})"
        if not (_default_of(f) is None and "default:" in help_text):  # else the help says what "unset" means
            help_text += f" [default: {_default_of(f)}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool or tp == (bool | None):
            # `--fp16` alone means true; the seed's `--fp16 True` / `--fp16 False` keep working.
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(*names, **kwargs)
    return parser


def load_config(cls, argv: list[str] | None, prog: str, description: str):
    """Parse flags (and `--config` YAML) into a validated `cls` instance or raise ConfigError."""
    parser = build_parser(cls, prog, description)
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    problems: list[str] = []
    for k, token in enumerate(unknown):
        if not token.startswith("--") and k > 0 and unknown[k - 1].startswith("--") and "=" not in unknown[k - 1]:
            continue  # the value of an unknown flag: already reported with it
        if token.startswith("--"):
            known = [f"--{f.name}" for f, _ in _fields(cls)]
            hint = _closest(token.split("=")[0], known)
            problems.append(f"unknown flag {token.split('=')[0]}" + (f" (did you mean {hint}?)" if hint else ""))
        else:
            problems.append(f"unexpected argument {token!r}")

    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_yaml(args.config, cls, problems))
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    values.update(flags)

    kwargs: dict[str, Any] = {}
    for f, tp in _fields(cls):
        if f.name not in values:
            continue
        try:
            kwargs[f.name] = _convert(values[f.name], tp)
        except ValueError as err:
            problems.append(f"{f.name}: {err}")
            continue
        choices = f.metadata.get("choices")
        if choices and "true" in choices and isinstance(kwargs[f.name], str):
            # switches with more than two states still take the seed's `--flag True` spellings
            low = kwargs[f.name].strip().lower()
            kwargs[f.name] = "true" if low in _TRUE else "false" if low in _FALSE else low
        if choices and kwargs[f.name] is not None and kwargs[f.name] not in choices:
            problems.append(f"{f.name}: must be one of {', '.join(map(str, choices))}, found {kwargs[f.name]!r}")
    cfg = cls(**kwargs)
    problems.extend(cfg.validate())
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str, cls, problems: list[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        problems.append(f"--config {path}: no such file")
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"--config {path}: not valid YAML: {err}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config {path}: expected a mapping of option: value, found {type(data).__name__}")
        return {}
    names: dict[str, str] = {}
    for f, _ in _fields(cls):
        names[f.name] = f.name
        for a in f.metadata.get("aliases", ()):
            names[a] = f.name
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = _closest(str(key), list(names))
            problems.append(f"--config {path}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
            continue
        out[names[key]] = value
    return out


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return match[0] if match else None


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def format_config(cfg) -> str:
    """The resolved config as YAML, for printing and for saving next to the artifacts."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"# resolved {type(cfg).__name__}\n" + format_config(cfg), encoding="utf-8")
    return p


def worker_resources(spec: str | None) -> dict[str, float]:
    """`--resources_per_worker` as a mapping (validated by `FinetuneConfig.validate`)."""
    return {k: float(v) for k, v in json.loads(spec).items()} if spec else {}


def _resource_problem(spec: str | None) -> str | None:
    if not spec:
        return None
    try:
        value = json.loads(spec)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno}), found {spec!r}; write e.g. '{{\"A100\": 1}}'"
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                              for v in value.values()):
        return f"expected a JSON object of resource names to positive amounts, found {spec!r}"
    if {"CPU", "GPU"} & set(value):
        return "CPU and GPU are set by --cpus_per_worker and --use_gpu; name only custom resources here"
    return None


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


# ---------------------------------------------------------------------------------------------
# Job configs


@dataclass
class FinetuneConfig:
    # model
    base_model: str = opt(DEFAULT_BASE_MODEL, "Hugging Face id (THUDM/chatglm2-6b, ...) or local model folder")
    revision: str | None = opt(None, "model revision (branch, tag or commit) on the Hugging Face hub")
    cache_dir: str | None = opt(None, "Hugging Face cache folder")
    local_files_only: bool = opt(False, "never download; read --base_model from disk or the local HF cache")
    trust_remote_code: bool = opt(False, "run model code from the model repo (off: ChatGLM needs none with glmops)")
    template: str | None = opt(None, "chat template; default: the one recorded with the model",
                               choices=("chatglm", "chatglm2", "chatglm3", "glm4", "hf"))
    # data
    data_path: str = opt(DEFAULT_DATA_PATH, "training data: JSON list, JSONL or Parquet (several: comma-separated or a "
                         "glob), a saved `datasets` folder or a hub dataset name")
    eval_data_path: str | None = opt(None, "separate eval data (same format); default: split --eval_ratio off the training data")
    eval_ratio: float = opt(0.05, "share of records held out for eval when no --eval_data_path is given")
    max_eval_samples: int = opt(2000, "at most this many held-out examples (eval runs over all of them at every eval)")
    skip_invalid_records: bool = opt(False, "drop malformed records (reported with reasons) instead of stopping")
    data_cache_dir: str | None = opt(None, "where tokenized data is cached and reused (default: <output_dir>/data_cache); "
                                     "delete it to clear")
    max_source_length: int = opt(512, "token budget of the prompt (history is dropped oldest-first to fit)")
    max_target_length: int = opt(512, "token budget of the answer (longer answers are cut, without an end token)")
    train_on_history: bool = opt(False, "learn every answer of a multi-turn record, not only the last one")
    # what is learned
    stage: str = opt("sft", "sft: learn the answers (instruction records); dpo: learn preferences from records with a "
                     "chosen and a rejected answer, with --pref_loss", choices=("sft", "dpo"))
    pref_loss: str = opt("sigmoid", "--stage dpo: sigmoid (DPO), ipo (IPO), simpo (SimPO: no reference, length-"
                         "normalized) or orpo (ORPO: no reference, the chosen answer's NLL plus an odds-ratio term)",
                         choices=("sigmoid", "ipo", "simpo", "orpo"))
    pref_beta: float | None = opt(None, "--stage dpo: beta of sigmoid, ipo and simpo (default 0.1; simpo 2.0)")
    simpo_margin: float = opt(1.0, "--pref_loss simpo: the target reward margin gamma")
    orpo_weight: float = opt(0.1, "--pref_loss orpo: lambda, the weight of the odds-ratio term")
    init_adapter: str | None = opt(None, "start from a trained adapter (usually an SFT run's): runs:/<run id>, "
                                   "models:/<name>/<version> or models:/<name>@<alias> (an adapter-only version), or "
                                   "an adapter folder; its LoRA settings replace --lora_*. With --stage dpo it is "
                                   "also the reference policy (sigmoid, ipo)")
    # training
    num_train_epochs: float = opt(3.0, "passes over the training data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run all epochs)")
    per_device_train_batch_size: int = opt(1, "examples per worker per micro-batch (pad-to-longest mode)")
    gradient_accumulation_steps: int | None = opt(None, "micro-batches per optimizer step (default: "
                                                  f"{LARGE_DATA_ACCUMULATION}, fewer when the data is small)")
    max_tokens_per_batch: int | None = opt(None, "token budget of one packed micro-batch per worker (packing mode; "
                                           f"default: {LARGE_DATA_TOKENS_PER_BATCH}; {ROOMY_TOKENS_PER_BATCH} on a GPU with room, "
                                           f"{TIGHT_TOKENS_PER_BATCH} on a tight one; less when the data is small)")
    packing: bool = opt(True, "pack several examples into one row without attention across them")
    learning_rate: float = opt(5e-4, "peak learning rate")
    lr_scheduler_type: str = opt("linear", "decay after warm-up", choices=("linear", "cosine", "constant"))
    warmup_steps: int | None = opt(None, "linear warm-up steps (default: --warmup_ratio of the total)")
    warmup_ratio: float = opt(0.03, "warm-up as a share of all optimizer steps, when --warmup_steps is not given")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 turns clipping off)")
    seed: int = opt(42, "seed for the data split, data order, LoRA init and dropout")
    # precision and quantization
    bits: int = opt(4, "quantize the base: 4 (NF4), 8 (LLM.int8) or 16 (no quantization)", choices=(4, 8, 16))
    quant_type: str = opt("nf4", "4-bit data type", choices=("nf4", "fp4"))
    double_quant: bool = opt(True, "quantize the 4-bit quantization constants too")
    bf16: bool | None = opt(None, "bf16 compute (default: on where the device supports it)")
    fp16: bool = opt(False, "fp16 compute (unstable with 4-bit weights; only where bf16 is unavailable)")
    gradient_checkpointing: str = opt("auto", "recompute activations in backward to save memory: auto (only as many "
                                      "layers as the GPU memory needs), true (all layers) or false",
                                      choices=("auto", "true", "false"))
    gpu_memory_gib: float | None = opt(None, "GPU memory a worker may use (default: the whole card); "
                                       "auto checkpointing plans for it and it is enforced")
    torch_compile: str = opt("auto", "torch.compile the decoder layers (fuses the small kernels around the 4-bit "
                             "matmuls; where memory is short, LoRA's dropout is then drawn again in backward instead of kept): auto "
                             "(on a CUDA GPU), true or false", choices=("auto", "true", "false"))
    # LoRA
    lora_r: int = opt(64, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.1, "dropout on the LoRA input")
    lora_target: list[str] = opt(["auto"], "modules to adapt: auto (per model family), all-linear, or names (comma-separated)")
    # eval, logging, checkpoints
    logging_steps: int | None = opt(None, "log a progress line every N optimizer steps (default: 50, or about "
                                    "ten lines for a shorter run)")
    eval_steps: int = opt(200, "evaluate and checkpoint every N optimizer steps", aliases=("save_steps",))
    eval_generate_samples: int = opt(32, "at each eval, greedy replies to this many held-out prompts, scored with "
                                     "BLEU-4 / ROUGE (common/metrics.py); 0 turns it off")
    eval_max_new_tokens: int = opt(128, "length limit of those replies")
    best_metric: str = opt("eval_loss", "what makes a checkpoint the best: the lowest eval loss, the highest "
                           "ROUGE-L (jieba words) or BLEU-4 (characters) of the eval replies, or (--stage dpo) the "
                           "highest share of eval pairs whose chosen answer gets the higher reward",
                           choices=("eval_loss", "rouge-l", "bleu-4", "eval_rewards_accuracy"))
    save_total_limit: int = opt(3, "checkpoints kept (the best by eval loss and the latest are always among them)")
    output_dir: str = opt("output", "where Ray Train keeps checkpoints (its storage_path)", aliases=("output_path",))
    run_name: str | None = opt(None, "name of this run in Ray and MLflow (default: finetune-<time>)")
    resume_from_checkpoint: str | None = opt(None, "a checkpoint folder of an earlier run to continue from")
    # cluster
    num_workers: int = opt(1, "Ray Train workers (one per GPU)")
    use_gpu: bool | None = opt(None, "train on GPUs (default: if the cluster has any)")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per worker")
    resources_per_worker: str | None = opt(None, 'more Ray resources each worker needs, as JSON, e.g. '
                                           '\'{"A100": 1}\': workers then only run on nodes that offer them')
    max_failures: int = opt(2, "how many worker failures to recover from by restoring the last checkpoint")
    # tracking
    mlflow_tracking_uri: str | None = opt(None, "MLflow server or store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    experiment_name: str = opt("glmops-finetune", "MLflow experiment")
    system_metrics_interval: float = opt(10.0, "seconds between samples of CPU, memory and GPU use logged to the run "
                                         "(system/* metrics, from the first worker's node; 0 turns them off)")
    dry_run: bool = opt(False, "validate config and data, tokenize (into the data cache), print statistics and exit "
                        "(no training, no MLflow)")

    def validate(self) -> list[str]:
        p: list[str] = []
        _check(p, bool(self.base_model.strip()), "base_model: must not be empty")
        _check(p, 0.0 <= self.eval_ratio < 1.0, f"eval_ratio: must be in [0, 1), found {self.eval_ratio}")
        _check(p, self.max_eval_samples >= 1, f"max_eval_samples: must be >= 1, found {self.max_eval_samples}")
        _check(p, self.max_source_length >= 8, f"max_source_length: must be >= 8, found {self.max_source_length}")
        _check(p, self.max_target_length >= 1, f"max_target_length: must be >= 1, found {self.max_target_length}")
        _check(p, self.num_train_epochs > 0, f"num_train_epochs: must be > 0, found {self.num_train_epochs}")
        _check(p, self.max_steps == -1 or self.max_steps > 0, f"max_steps: must be -1 or > 0, found {self.max_steps}")
        _check(p, self.per_device_train_batch_size >= 1,
               f"per_device_train_batch_size: must be >= 1, found {self.per_device_train_batch_size}")
        _check(p, self.gradient_accumulation_steps is None or self.gradient_accumulation_steps >= 1,
               f"gradient_accumulation_steps: must be >= 1, found {self.gradient_accumulation_steps}")
        # a preference pair's two sequences train in one row
        one, sizes = (("preference pair", "2 x (max_source_length + max_target_length)") if self.stage == "dpo"
                      else ("example", "max_source_length + max_target_length"))
        longest = (self.max_source_length + self.max_target_length) * (2 if self.stage == "dpo" else 1)
        _check(p, self.max_tokens_per_batch is None or not self.packing or self.max_tokens_per_batch >= longest,
               f"max_tokens_per_batch: must hold one full {one} ({sizes} = {longest}), "
               f"found {self.max_tokens_per_batch}")
        _check(p, self.pref_beta is None or self.pref_beta > 0, f"pref_beta: must be > 0, found {self.pref_beta}")
        _check(p, self.orpo_weight >= 0, f"orpo_weight: must be >= 0, found {self.orpo_weight}")
        _check(p, not self.best_metric.startswith("eval_rewards") or self.stage == "dpo",
               f"best_metric {self.best_metric}: only with --stage dpo")
        resource_problem = _resource_problem(self.resources_per_worker)
        _check(p, resource_problem is None, f"resources_per_worker: {resource_problem}")
        _check(p, self.gpu_memory_gib is None or self.gpu_memory_gib > 0,
               f"gpu_memory_gib: must be > 0, found {self.gpu_memory_gib}")
        _check(p, self.learning_rate > 0, f"learning_rate: must be > 0, found {self.learning_rate}")
        _check(p, self.warmup_steps is None or self.warmup_steps >= 0,
               f"warmup_steps: must be >= 0, found {self.warmup_steps}")
        _check(p, 0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio: must be in [0, 1), found {self.warmup_ratio}")
        _check(p, self.weight_decay >= 0, f"weight_decay: must be >= 0, found {self.weight_decay}")
        _check(p, self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, found {self.max_grad_norm}")
        _check(p, not (self.fp16 and self.bf16), "fp16 and bf16: choose one")
        _check(p, self.lora_r >= 1, f"lora_r: must be >= 1, found {self.lora_r}")
        _check(p, self.lora_alpha > 0, f"lora_alpha: must be > 0, found {self.lora_alpha}")
        _check(p, 0.0 <= self.lora_dropout < 1.0, f"lora_dropout: must be in [0, 1), found {self.lora_dropout}")
        _check(p, bool(self.lora_target), "lora_target: name at least one module, or auto / all-linear")
        _check(p, self.logging_steps is None or self.logging_steps >= 1, f"logging_steps: must be >= 1, found {self.logging_steps}")
        _check(p, self.eval_steps >= 1, f"eval_steps: must be >= 1, found {self.eval_steps}")
        _check(p, self.eval_generate_samples >= 0,
               f"eval_generate_samples: must be >= 0, found {self.eval_generate_samples}")
        _check(p, self.eval_max_new_tokens >= 1, f"eval_max_new_tokens: must be >= 1, found {self.eval_max_new_tokens}")
        _check(p, self.best_metric in ("eval_loss", "eval_rewards_accuracy") or self.eval_generate_samples > 0,
               f"best_metric {self.best_metric}: needs eval replies; set --eval_generate_samples > 0")
        _check(p, self.save_total_limit >= 1, f"save_total_limit: must be >= 1, found {self.save_total_limit}")
        _check(p, self.num_workers >= 1, f"num_workers: must be >= 1, found {self.num_workers}")
        _check(p, self.cpus_per_worker > 0, f"cpus_per_worker: must be > 0, found {self.cpus_per_worker}")
        _check(p, self.max_failures >= 0, f"max_failures: must be >= 0, found {self.max_failures}")
        _check(p, self.system_metrics_interval >= 0,
               f"system_metrics_interval: must be >= 0, found {self.system_metrics_interval}")
        if self.resume_from_checkpoint:
            _check(p, Path(self.resume_from_checkpoint).is_dir(),
                   f"resume_from_checkpoint: {self.resume_from_checkpoint} is not a folder")
        return p


@dataclass
class MergeConfig:
    run_id: str | None = opt(None, "MLflow run of a fine-tune: merge its best checkpoint")
    experiment: str | None = opt(None, "MLflow experiment: merge the best run's best checkpoint (lowest eval loss)")
    lora_model: str | None = opt(None, "an adapter folder (seed-compatible)")
    output_dir: str | None = opt(None, "where the merged model goes (default: models/<base-name>-finetune)",
                                 aliases=("output_path",))
    overwrite: bool = opt(False, "replace a non-empty --output_dir")
    dtype: str = opt("bf16", "dtype of the merged weights", choices=("bf16", "fp16", "fp32"))
    device: str = opt("cpu", "where to merge (cpu or cuda)")
    merge_base: str = opt("original", "merge into the original weights or the NF4 round-tripped base",
                          choices=("original", "nf4_roundtrip"))
    registered_model: str | None = opt(None, "MLflow registered model name (default: derived from the base name)")
    alias: str = opt("champion", "registry alias moved to the new version")
    adapter_only: bool = opt(False, "register the adapter alone (a few MB) with what it needs on its base (the base "
                                    "and its content hash, family, template, bits, LoRA config); no merged copy")
    mlflow_tracking_uri: str | None = opt(None, "MLflow server or store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    local_files_only: bool = opt(False, "never download the base model")
    trust_remote_code: bool = opt(False, "run model code from the model repo")

    def validate(self) -> list[str]:
        p: list[str] = []
        chosen = [n for n in ("run_id", "experiment", "lora_model") if getattr(self, n)]
        _check(p, len(chosen) == 1,
               "choose the adapter with exactly one of --run_id, --experiment or --lora_model"
               + (f" (found {', '.join(chosen)})" if chosen else ""))
        _check(p, bool(self.alias.strip()), "alias: must not be empty")
        return p


@dataclass
class ServeConfig:
    model: str = opt("models/tiny-chatglm2", "registry URI (models:/name@alias), local folder or HF id",
                     aliases=("model_path",))
    bits: int = opt(16, "quantize at load time: 4, 8 or 16 (none)", choices=(4, 8, 16))
    dtype: str = opt("auto", "weights dtype", choices=("auto", "bf16", "fp16", "fp32"))
    fp16: bool = opt(False, "seed spelling of --dtype fp16")
    device: str = opt("auto", "cpu, cuda or auto")
    replicas: int = opt(1, "model replicas")
    engine: str = opt("batch", "batch (continuous batching) or per_request (the old path, for comparison)",
                      choices=("batch", "per_request"))
    max_num_seqs: int | None = opt(None, "sequences a replica decodes together (default: 128 on GPU, 16 on CPU)")
    max_model_len: int | None = opt(None, "prompt + reply tokens per request (default: the model's context, as "
                                    "GPU memory allows)")
    max_queued_requests: int = opt(256, "requests waiting per replica; more get 429")
    prefill_chunk: int | None = opt(None, "prompt tokens in an engine step while nothing decodes (default: 2048 GPU, 512 CPU)")
    step_tokens: int | None = opt(None, "a step's tokens while streams decode: one per decode row, the rest (at "
                                  "least a quarter) for prompts; lower keeps streams' pace under load, higher "
                                  "admits prompts faster (default: 2048 GPU, 256 CPU)")
    prefix_cache: bool = opt(True, "keep a finished request's KV cache in its slot until the slot is needed, and "
                             "prefill only what a new prompt adds to it (a conversation's next turn)")
    stream_interval: float = opt(0.04, "longest wait between two chunks of a stream (shorter while few streams run)")
    decode_gemv: str = opt("auto", "GPU decode steps of at most 4 rows: each projection through a Triton GEMV where "
                           "start-up timing finds it faster than cuBLAS (auto), or always cuBLAS (off)",
                           choices=("auto", "off"))
    engine_process: bool | None = opt(None, "run the engine in a child process (default: on GPU)")
    ingress_replicas: int | None = opt(None, "HTTP front-end replicas (default: 2 on GPU, 1 on CPU)")
    max_concurrent_requests: int = opt(32, "engine=per_request: streams one replica serves at once")
    host: str = opt("127.0.0.1", "HTTP bind address")
    port: int = opt(8000, "HTTP port")
    api_key: str | None = opt(None, "bearer key the HTTP API and the web page require (default: $GLMOPS_API_KEY)")
    template: str | None = opt(None, "chat template; default: the one recorded with the model",
                               choices=("chatglm", "chatglm2", "chatglm3", "glm4", "hf"))
    trust_remote_code: bool = opt(False, "run model code from the model repo")

    def validate(self) -> list[str]:
        p: list[str] = []
        _check(p, self.replicas >= 1, f"replicas: must be >= 1, found {self.replicas}")
        _check(p, self.max_concurrent_requests >= 1,
               f"max_concurrent_requests: must be >= 1, found {self.max_concurrent_requests}")
        _check(p, 1 <= self.port <= 65535, f"port: must be in 1..65535, found {self.port}")
        return p


@dataclass
class EvaluateConfig:
    model: str | None = opt(None, "the model to score: a registry URI (models:/name@alias, models:/name/3), an MLflow "
                            "run id (its best adapter on its base, unmerged), a local folder or a hub id")
    compare: list[str] = opt([], "several models to score side by side (comma-separated, each as for --model), "
                             "e.g. the base and the fine-tuned one")
    via_url: str | None = opt(None, "score a running glmops server through its OpenAI API instead of loading a model; "
                              "with --model or --compare, those are models it serves (adapter names, runs:/..., "
                              "models:/...)")
    api_key: str | None = opt(None, "the server's API key, with --via_url (default: $GLMOPS_API_KEY)")
    data_path: str = opt(DEFAULT_DATA_PATH, "records to score on, in the training data's format (JSON, JSONL, Parquet, "
                         "hub dataset)")
    max_samples: int = opt(200, "score at most this many records (the first ones of the file)")
    max_new_tokens: int = opt(128, "reply length limit (greedy decoding)")
    batch_size: int = opt(8, "prompts generated together")
    bits: int | None = opt(None, "load the models in 4, 8 or 16 bits (default: an adapter on the base as trained, "
                           "others in 16)", choices=(4, 8, 16))
    device: str = opt("auto", "cpu, cuda or auto")
    template: str | None = opt(None, "chat template; default: the one recorded with each model",
                               choices=("chatglm", "chatglm2", "chatglm3", "glm4", "hf"))
    mlflow_tracking_uri: str | None = opt(None, "MLflow server or store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    experiment_name: str = opt("glmops-evaluate", "MLflow experiment of the evaluation runs")
    run_name: str | None = opt(None, "name of the evaluation run (default: evaluate-<time>)")
    local_files_only: bool = opt(False, "never download a model")
    trust_remote_code: bool = opt(False, "run model code from the model repo")

    @property
    def models(self) -> list[str]:
        return [self.model] if self.model else list(self.compare)

    def validate(self) -> list[str]:
        p: list[str] = []
        given = sum(bool(x) for x in (self.model, self.compare))
        _check(p, given == 1 or (given == 0 and self.via_url),
               "choose what to score with one of --model or --compare (with --via_url: served models), or --via_url "
               "alone (the server's base)")
        _check(p, not self.compare or len(self.compare) >= 2,
               "compare: name at least two models (use --model for one)")
        _check(p, self.max_samples >= 1, f"max_samples: must be >= 1, found {self.max_samples}")
        _check(p, self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, found {self.max_new_tokens}")
        _check(p, self.batch_size >= 1, f"batch_size: must be >= 1, found {self.batch_size}")
        return p
