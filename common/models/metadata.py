"""The self-description a model or adapter folder carries (glmops.json): family, template, lineage.

Jobs and the server read it instead of being told again, which is what keeps the prompt format of
training and serving the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METADATA_FILE = "glmops.json"


def write_model_metadata(folder: str | Path, *, family: str, template: str, base_model: str,
                         revision: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    meta = {"family": family, "template": template, "base_model": base_model, "revision": revision}
    meta.update(extra or {})
    path = Path(folder) / METADATA_FILE
    path.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def read_model_metadata(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
