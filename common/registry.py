"""Registered models: a registry URI (models:/name@alias, models:/name/3), a local folder or a hub id → a local
folder (the server and jobs/evaluate.py load from it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from common.errors import UserError


def registry_version(model: str, uri: str) -> tuple[str, str]:
    """(name, version) of `models:/name@alias` or `models:/name/3`."""
    from mlflow import MlflowClient

    ref = model.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, MlflowClient(uri).get_model_version_by_alias(name, alias).version
        name, version = ref.rsplit("/", 1)
        MlflowClient(uri).get_model_version(name, version)
        return name, version
    except Exception as err:  # noqa: BLE001 - registry errors come in many types
        raise UserError(f"{model}: not found in the registry at {uri} ({type(err).__name__}).") from None


def download_version(model: str, tracking_uri: str | None = None) -> tuple[Path, str, str]:
    """`models:/name@alias` (or `models:/name/3`): its files, downloaded once per version into the glmops cache;
    returns (folder, name, version)."""
    import mlflow

    from common.tracking import default_tracking_uri

    uri = default_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    name, version = registry_version(model, uri)
    key = hashlib.sha256(f"{uri}|{name}|{version}".encode()).hexdigest()[:12]
    dst = cache_dir() / "registry" / f"{name}-v{version}-{key}"
    if not (dst / "config.json").is_file() and not (dst / "adapter_config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst))
    return dst, name, version


def cache_dir() -> Path:
    return Path(os.environ.get("GLMOPS_CACHE", Path.home() / ".cache" / "glmops"))


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def local_model_folder(model: str, tracking_uri: str | None = None) -> Path:
    """A model's local folder: a registry URI's files downloaded (`download_version`), else the path itself."""
    if not model.startswith("models:/"):
        return Path(model)
    dst, _, _ = download_version(model, tracking_uri)
    if is_adapter_folder(dst):
        import json

        meta = json.loads((dst / "glmops.json").read_text(encoding="utf-8")) if (dst / "glmops.json").is_file() else {}
        raise UserError(f"{model} is an adapter-only version (registered with --adapter_only; base "
                        f"{meta.get('base_model', 'unknown')}): it is not a model on its own. Serve it on its base "
                        f"(serve run serving:app model={meta.get('base_model', '<base>')} adapters=NAME={model}) or "
                        f"merge it: python jobs/merge.py --lora_model {dst}")
    return dst
