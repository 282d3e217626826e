"""Scoring models by what they reply: which model (a registry version, a training run's adapter, a folder, a
hub id, or a running server), greedy replies on held-out records, the scores of common/metrics.py, and the
evaluation's MLflow run (metrics, one table of prompt / reference / replies, tags on registry versions)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from common.chat_records import openai_messages
from common.data import Conversation, record_to_conversation
from common.errors import DataError, ModelFilesError, UserError
from common.generation import prompt_text
from common.metrics import SCORES, average, score
from common.templates import get_template
from common.tool_eval import TOOL_SCORES, Reply, read_reply, reference_text, reply_text, tool_scores
from common.tools import ToolCall

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Candidate:
    """One model to score: how it replies, and what it is in the registry and the tracking store."""

    label: str                                   # its column in the printed table and the MLflow table
    spec: str                                    # what the user named
    generate: Callable[[list[Conversation], Callable[[int], None]], list[Reply]]
    links: dict[str, str] = field(default_factory=dict)  # tags for the evaluation run (version, training run)
    version: tuple[str, str] | None = None       # (registered name, version): gets its scores as tags


@dataclass
class Scored:
    candidate: Candidate
    replies: list[Reply]
    rows: list[dict[str, float]]
    tools: dict[str, float] = field(default_factory=dict)  # tool-call scores, for data with tools

    @property
    def mean(self) -> dict[str, float]:
        return {**average(self.rows), **self.tools}


def load_conversations(data_path: str, limit: int) -> list[Conversation]:
    """The first `limit` records, validated as training data is (a bad record names file, record and field).

    Read chunk by chunk through the training data's source planner, stopping once `limit` good records are
    in: scoring 200 records of a 1M-record file never holds the file in memory."""
    from common.data import MAX_REPORTED, check_record
    from common.training.sources import plan_sources, read_chunk

    convs: list[Conversation] = []
    problems: list[str] = []
    read = 0
    for chunk in plan_sources(data_path).chunks:
        for item in read_chunk(chunk):
            read += 1
            found = [item.problem] if item.problem else check_record(item.index, item.record)
            for p in found:
                p.line = item.line if chunk.kind == "jsonl" else 0
                problems.append(p.describe(chunk.path))
            if not found:
                convs.append(record_to_conversation(item.record))
            if len(convs) >= limit:
                break
        if len(convs) >= limit:
            break
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more problem(s)" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{data_path}: invalid records among the first {read} read:\n{shown}{more}\n"
                        "Fix them: every record is scored against its output.")
    if not convs:
        raise DataError(f"{data_path}: no records to score.")
    return convs


# -- which model --------------------------------------------------------------------------------------------

def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _local(model, tok, template: str, cfg) -> Callable:
    from common.generation import generate_replies

    device = next(model.parameters()).device

    name = cfg.template or template
    clean = get_template(name).clean_reply

    def generate(convs: list[Conversation], progress: Callable[[int], None]) -> list[Reply]:
        raw = generate_replies(model, tok, name, convs, device, cfg.max_new_tokens, batch_size=cfg.batch_size,
                               progress=progress, raw=True)
        return [read_reply(name, r) if c.tools else clean(r) for c, r in zip(convs, raw)]

    return generate


def _load_folder(spec: str, cfg, bits: int):
    import torch

    from common.models.loader import load_model, load_tokenizer, open_model_folder

    info = open_model_folder(spec, local_files_only=cfg.local_files_only)
    device = _device(cfg.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(info, bits=bits, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code).eval()
    return model, load_tokenizer(info, cfg.trust_remote_code), info


def open_candidate(spec: str, cfg, uri: str) -> Candidate:
    """`models:/...`, a training run id, a folder or a hub id, loaded for greedy generation."""
    if spec.startswith("models:/"):
        from common.registry import local_model_folder, registry_version

        name, version = registry_version(spec, uri)
        folder = local_model_folder(f"models:/{name}/{version}", uri)
        model, tok, info = _load_folder(str(folder), cfg, cfg.bits or 16)
        links = {"model_version": f"{name}/{version}"}
        from mlflow import MlflowClient

        tags = MlflowClient(uri).get_model_version(name, version).tags
        if tags.get("training_run_id") not in (None, "None"):
            links["training_run_id"] = tags["training_run_id"]
        return Candidate(f"{name} v{version}", spec, _local(model, tok, info.template, cfg), links, (name, version))
    if RUN_ID.fullmatch(spec) and not Path(spec).exists():
        from peft import PeftModel

        from common.merging import find_adapter

        source = find_adapter(SimpleNamespace(lora_model=None, run_id=spec, experiment=None), uri)
        meta = source.metadata
        try:
            model, tok, info = _load_folder(meta["base_model"], cfg, cfg.bits or int(meta.get("bits", 16)))
        except ModelFilesError as err:
            raise UserError(f"run {spec}: the adapter's base model cannot be found: {err}") from None
        model = PeftModel.from_pretrained(model, str(source.path)).eval()
        template = meta.get("template") or info.template
        return Candidate(f"run {spec[:8]}", spec, _local(model, tok, template, cfg), {"training_run_id": spec})
    model, tok, info = _load_folder(spec, cfg, cfg.bits or 16)
    return Candidate(Path(spec).name or spec, spec, _local(model, tok, info.template, cfg))


def server_candidate(url: str, api_key: str | None, cfg, model: str | None = None) -> Candidate:
    """A running glmops server, through its OpenAI chat API: greedy (temperature 0), the same length limit.
    `model`: one of the models it serves (an adapter's name, runs:/..., models:/...); None: its base."""
    import httpx

    def ask(client: httpx.Client, conv: Conversation) -> Reply:
        body = {"messages": openai_messages(conv), "temperature": 0, "max_tokens": cfg.max_new_tokens}
        if conv.tools:
            body["tools"] = [{"type": "function", "function": spec} for spec in conv.tools]
        if model:
            body["model"] = model
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            what = f" (model {model})" if model else ""
            raise UserError(f"--via_url {url}{what}: the server answered {r.status_code}: {r.text[:300]}")
        message = r.json()["choices"][0]["message"]
        if message.get("tool_calls"):
            fn = message["tool_calls"][0]["function"]
            return ToolCall(fn["name"], json.loads(fn["arguments"]))
        return message["content"] or ""

    def generate(convs: list[Conversation], progress: Callable[[int], None]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as client, \
                    ThreadPoolExecutor(cfg.batch_size) as pool:  # the server batches concurrent requests
                out = []
                for reply in pool.map(lambda c: ask(client, c), convs):
                    out.append(reply)
                    progress(1)
                return out
        except httpx.ConnectError:
            raise UserError(f"--via_url {url}: cannot reach the server. Start it with `serve run serving:app`.") \
                from None

    links = {"served_url": url, **({"served_model": model} if model else {})}
    return Candidate(model or url, f"{url} {model}" if model else url, generate, links)


# -- scoring and recording ------------------------------------------------------------------------------------

class Progress:
    """A dense line per model, redrawn in place on a terminal."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, total, 0, time.time()

    def __call__(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.time() - self.t0, 1e-9)
        end = "\n" if self.done >= self.total else ("\r" if sys.stdout.isatty() else "\n")
        print(f"  generating [{self.label}] {self.done}/{self.total} replies ({rate:.1f}/s)", end=end, flush=True)


def score_candidate(candidate: Candidate, convs: list[Conversation]) -> Scored:
    replies = candidate.generate(convs, Progress(candidate.label, len(convs)))
    rows = [score(reply_text(r), reference_text(c)) for r, c in zip(replies, convs)]
    return Scored(candidate, replies, rows, tool_scores(convs, replies))


def table(results: list[Scored], convs: list[Conversation]) -> dict[str, list]:
    """The per-example table: prompt, reference, then each model's reply and ROUGE-L."""
    data: dict[str, list] = {"prompt": [prompt_text(c) for c in convs], "reference": [reference_text(c) for c in convs]}
    for r in results:
        data[f"reply [{r.candidate.label}]"] = [reply_text(x) for x in r.replies]
        data[f"rouge-l_jieba [{r.candidate.label}]"] = [round(row["rouge-l_jieba"], 2) for row in r.rows]
    return data


def format_scores(results: list[Scored]) -> str:
    """Models as rows, scores as columns (the tool-call scores too, for data with tools)."""
    width = max(12, *(len(r.candidate.label) for r in results))
    keys = [*SCORES, *(k for k in TOOL_SCORES if any(k in r.tools for r in results))]
    head = f"{'model':<{width}}  " + "  ".join(f"{k:>13}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.candidate.label:<{width}}  " + "  ".join(f"{r.mean.get(k, 0.0):>{max(13, len(k))}.2f}"
                                                                   for k in keys))
    return "\n".join(lines)


def log_evaluation(uri: str, cfg, results: list[Scored], convs: list[Conversation], source_tags: dict) -> str:
    """One MLflow run: each model's means (prefixed by its label when several), the table, links; registry
    versions get their scores as tags (`eval.<score>`)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from common.tracking import experiment_id, mark_model_training

    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.experiment_name, uri)
    mark_model_training(client, exp_id)
    tags = {**source_tags, "glmops.job": "evaluate", "models": json.dumps([r.candidate.spec for r in results])}
    if len(results) == 1:
        tags.update(results[0].candidate.links)
    else:
        for r in results:
            tags.update({f"{k} [{r.candidate.label}]": v for k, v in r.candidate.links.items()})
    run = client.create_run(exp_id, run_name=cfg.run_name or time.strftime("evaluate-%Y%m%d-%H%M%S"), tags=tags)
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for r in results:
        prefix = "" if len(results) == 1 else f"{_metric_label(r.candidate.label)}/"
        metrics += [Metric(f"{prefix}{k}", v, now, 0) for k, v in r.mean.items()]
    params = [Param("data_path", cfg.data_path), Param("examples", str(len(convs))),
              Param("max_new_tokens", str(cfg.max_new_tokens)), Param("decoding", "greedy")]
    client.log_batch(rid, metrics=metrics, params=params)
    client.log_table(rid, data=table(results, convs), artifact_file="eval_generations.json")
    for r in results:
        if r.candidate.version:
            name, version = r.candidate.version
            for k, v in r.mean.items():
                client.set_model_version_tag(name, version, f"eval.{k}", f"{v:.2f}")
            client.set_model_version_tag(name, version, "eval.run_id", rid)
            client.set_model_version_tag(name, version, "eval.data", cfg.data_path)
    client.set_terminated(rid, "FINISHED")
    return rid


def _metric_label(label: str) -> str:
    """A label as MLflow accepts it in a metric name (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", label)
