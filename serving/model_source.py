"""Where the served model comes from: a registry URI, a local folder or a hub id → a local folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from common.errors import UserError


def local_model_folder(model: str, tracking_uri: str | None = None) -> Path:
    """`models:/name@alias` (or `models:/name/3`) is downloaded once per version into the glmops cache."""
    if not model.startswith("models:/"):
        return Path(model)
    import mlflow
    from mlflow import MlflowClient

    from common.tracking import default_tracking_uri

    uri = default_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    ref = model.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, version = ref.rsplit("/", 1)
    except Exception as err:  # noqa: BLE001 - registry errors come in many types
        raise UserError(f"{model}: not found in the registry at {uri} ({type(err).__name__}).") from None
    key = hashlib.sha256(f"{uri}|{name}|{version}".encode()).hexdigest()[:12]
    dst = Path(os.environ.get("GLMOPS_CACHE", Path.home() / ".cache" / "glmops")) / "registry" / f"{name}-v{version}-{key}"
    if not (dst / "config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst))
    return dst
