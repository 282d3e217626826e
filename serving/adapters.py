"""Which adapter a request's `model` names: a configured name, or an MLflow URI, resolved to local files.

  serve run serving:app model=<base> adapters=support=models:/glm-adapter@champion,exp7=runs:/<run_id>

A request's `model` may be the base's name or "base" (or be left out), a configured name, or directly
  runs:/<run_id>               that run's best adapter (its best checkpoint's folder, else its `adapter` artifact)
  models:/<name>@<alias>       an adapter-only registry version (jobs/merge.py --adapter_only)
  models:/<name>/<version>
Files are downloaded once into the glmops cache (a version's and a run's files never change; an alias is looked
up again after ALIAS_TTL_S). Before a request is admitted its adapter is checked against the served base: the
base's content hash where the adapter carries one (its registry version does), else the base's id or folder;
and its LoRA config against what the pool holds (rank up to max_lora_rank, plain LoRA). Errors, in OpenAI's
shape at the ingress: an unknown name or URI is a 404 that lists what exists (`UnknownModel`); an adapter that
cannot go on this base, or a run without an adapter, a 400 that says why (`BadAdapter`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from serving.lora import Adapter, AdapterError, check_adapter_config, read_adapter_config

log = logging.getLogger("ray.serve")

ALIAS_TTL_S = 30.0  # an alias may be moved to another version: looked up again after this long
URI_PREFIXES = ("runs:/", "models:/")


class UnknownModel(Exception):
    """404: no configured adapter, run or registry version of that name."""


class BadAdapter(Exception):
    """400: it exists, but cannot be served on this base (another base, no adapter, a rank over the pool's)."""


def parse_adapters(spec: str | None, base_name: str) -> dict[str, str]:
    """`name=URI,name2=URI2` (URI: runs:/..., models:/... or a local adapter folder) → {name: URI}."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        name, sep, uri = item.partition("=")
        name, uri = name.strip(), uri.strip()
        if not sep or not name or not uri:
            raise ValueError(f"adapters: expected name=URI items separated by commas, found {item!r}")
        if name in out or name in (base_name, "base") or name.startswith(URI_PREFIXES) or "/" in name:
            raise ValueError(f"adapters: {name!r} is not a usable name (names are unique, are not 'base' or the "
                             "base's name, and contain no '/')")
        out[name] = uri
    return out


@dataclass
class Resolved:
    adapter: Adapter
    uri: str
    at: float


class AdapterCatalog:
    def __init__(self, base_name: str, base_folder: Path, configured: dict[str, str], tracking_uri: str | None,
                 max_rank: int, enabled: bool):
        self.base_name, self.base_folder = base_name, Path(base_folder)
        self.configured, self.tracking_uri, self.max_rank, self.enabled = configured, tracking_uri, max_rank, enabled
        self.resolved: dict[str, Resolved] = {}  # by the name requests use
        self._pending: dict[str, asyncio.Future] = {}
        self._base_hash: str | None = None

    # -- what requests may name ---------------------------------------------------------------------------------
    def listing(self, loaded: list[str] = ()) -> list[dict]:
        """/v1/models: the base, the configured adapters, and the adapters resolved since start-up; `loaded`: the
        folders of the adapters in a device slot now."""
        rows = [{"id": self.base_name, "object": "model", "owned_by": "glmops", "created": 0}]
        names = list(self.configured) + [n for n in self.resolved if n not in self.configured]
        for name in names:
            rows.append({"id": name, "object": "model", "owned_by": "glmops", "created": 0, "parent": self.base_name,
                         "source": self.configured.get(name, name),
                         "loaded": name in self.resolved and self.resolved[name].adapter.folder in loaded})
        return rows

    def is_base(self, model: str | None) -> bool:
        return not model or model in (self.base_name, "base")

    def needs_io(self, model: str) -> bool:
        """Will resolving `model` read the registry or download? (The replica tells the ingress to wait longer.)"""
        hit = self.resolved.get(model)
        if hit is None:
            return model in self.configured or model.startswith(URI_PREFIXES)
        return hit.uri.startswith("models:/") and "@" in hit.uri and time.monotonic() - hit.at > ALIAS_TTL_S

    async def resolve(self, model: str | None) -> Adapter | None:
        """The adapter a request names (None: the base). Raises UnknownModel or BadAdapter."""
        if self.is_base(model):
            return None
        if not self.enabled:
            raise UnknownModel(f"model {model!r} does not exist: this server serves {self.base_name!r} without "
                               "adapters (start it with max_loras >= 1)")
        if model not in self.configured and not model.startswith(URI_PREFIXES):
            raise UnknownModel(self._unknown(model))
        if not self.needs_io(model):
            return self.resolved[model].adapter
        future = self._pending.get(model)
        if future is None:  # one resolution per name, however many requests wait for it
            future = self._pending[model] = asyncio.ensure_future(asyncio.to_thread(self._resolve_now, model))
            future.add_done_callback(lambda _: self._pending.pop(model, None))
        resolved = await asyncio.shield(future)
        self.resolved[model] = resolved
        return resolved.adapter

    def resolve_configured(self) -> None:
        """At start-up: every configured adapter resolved and checked (a typo fails the start, not a request)."""
        for name in self.configured:
            try:
                self.resolved[name] = self._resolve_now(name)
            except (UnknownModel, BadAdapter) as err:
                raise ValueError(f"adapters: {name}={self.configured[name]}: {err}") from None

    def _unknown(self, model: str) -> str:
        names = [self.base_name, *self.configured]
        return (f"model {model!r} does not exist. This server has {', '.join(repr(n) for n in names)}; an adapter "
                "may also be named by runs:/<run_id> or models:/<name>@<alias> (or /<version>)")

    # -- resolution (a thread: registry calls and downloads) -----------------------------------------------------
    def _resolve_now(self, model: str) -> Resolved:
        uri = self.configured.get(model, model)
        if uri.startswith("runs:/"):
            folder = self._run_adapter(uri)
        elif uri.startswith("models:/"):
            folder = self._version_adapter(uri)
        else:  # a configured local folder
            folder = Path(uri)
            if not (folder / "adapter_config.json").is_file():
                raise UnknownModel(f"{uri}: no adapter_config.json there")
        self._check(model, folder)
        log.info("adapter %s resolved to %s", model, folder)
        return Resolved(Adapter(model, str(folder)), uri, time.monotonic())

    def _run_adapter(self, uri: str) -> Path:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from common.merging import adapter_of_run
        from common.registry import cache_dir
        from common.tracking import default_tracking_uri

        run_id = uri.removeprefix("runs:/").split("/")[0]
        tracking = default_tracking_uri(self.tracking_uri)
        try:
            MlflowClient(tracking).get_run(run_id)
        except MlflowException:
            raise UnknownModel(f"{uri}: no run {run_id!r} at the tracking server") from None
        key = hashlib.sha256(f"{tracking}|{run_id}".encode()).hexdigest()[:12]
        try:
            return adapter_of_run(run_id, tracking, dst=cache_dir() / "adapters" / f"run-{run_id}-{key}").path
        except UserError as err:
            raise BadAdapter(f"{uri}: {err}") from None

    def _version_adapter(self, uri: str) -> Path:
        from common.registry import download_version, is_adapter_folder

        try:
            folder, name, version = download_version(uri, self.tracking_uri)
        except UserError as err:
            raise UnknownModel(str(err)) from None
        if not is_adapter_folder(folder):
            raise BadAdapter(f"{uri} (version {version} of {name}) is a whole model, not an adapter-only version "
                             f"(jobs/merge.py --adapter_only registers those); serve it as model={uri}")
        return folder

    def _check(self, model: str, folder: Path) -> None:
        """The adapter goes on this base, with a config the pool can apply."""
        from common.models.metadata import read_model_metadata

        meta = read_model_metadata(folder) or {}
        try:
            check_adapter_config(read_adapter_config(folder), model, self.max_rank)
        except AdapterError as err:
            raise BadAdapter(str(err)) from None
        needs = meta.get("base_model") or read_adapter_config(folder).get("base_model_name_or_path")
        if meta.get("base_hash"):
            if meta["base_hash"] != self.base_hash():
                raise BadAdapter(f"adapter {model} was trained on base {needs} (content hash "
                                 f"{meta['base_hash'][:12]}), not on the base this server serves ({self.base_name}, "
                                 f"hash {self.base_hash()[:12]}): serve it with model={needs}")
        elif needs and not self._same_base(needs):
            raise BadAdapter(f"adapter {model} was trained on base {needs}, not on the base this server serves "
                             f"({self.base_name}): serve it with model={needs}")

    def _same_base(self, needs: str) -> bool:
        if needs == self.base_name:
            return True
        try:
            return Path(needs).resolve() == self.base_folder.resolve()
        except OSError:
            return False

    def base_hash(self) -> str:
        """The served base's content hash (common/merging.content_hash), once per process; cached on disk by
        the weight files' names, sizes and times, so a restart does not read 12 GB again."""
        if self._base_hash is None:
            from common.merging import content_hash, weight_files
            from common.registry import cache_dir

            files = weight_files(self.base_folder)
            stamp = hashlib.sha256(json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                                               for p in files]).encode()).hexdigest()[:24]
            cached = cache_dir() / "base-hashes" / stamp
            if cached.is_file():
                self._base_hash = cached.read_text().strip()
            else:
                t0 = time.time()
                self._base_hash = content_hash(self.base_folder)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(self._base_hash)
                log.info("content hash of the base %s: %.1f s", self.base_folder, time.time() - t0)
        return self._base_hash
