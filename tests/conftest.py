"""Shared fixtures: the tiny model built once per session, the THUDM reference data when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import common.models  # noqa: F401 - our tokenizers and ChatGLM-6B with the Auto classes, as users load folders

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("GLMOPS_REFERENCE", ROOT.parent / "shared" / "reference"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Converted THUDM checkpoints are cached; keep the tests' copies out of the user's cache.
os.environ["GLMOPS_CACHE"] = tempfile.mkdtemp(prefix="glmops-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller looks at its workers every 2 s, so a finished (or dead) worker is noticed up to 2 s
# late, a few times per job: ~4 s of each tiny fine-tune's ~30 s. The jobs the tests start inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from common.models.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-chatglm2"), str(ROOT / "data/sample.json"))


@pytest.fixture(scope="session")
def ray_head():
    """One `ray start --head` on loopback (2 CPUs, as a job's own local Ray here) that the fine-tune tests' jobs
    join through RAY_ADDRESS, as jobs join a cluster: starting and stopping a local Ray costs each job ~5 s on
    2 cores. Tests of Ray's own behaviour (memory monitor, nodes, ...) start their own."""
    from ray_cluster import RayHead

    head = RayHead(num_cpus=2).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory) -> Path:
    """GLM-4-0414's layout (transformers' Glm4ForCausalLM) with GLM-4's tokens and template."""
    from common.models.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-glm4-0414"), str(ROOT / "data/sample.json"),
                            family="glm4", arch="glm4")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def reference_dir(version: str) -> Path:
    d = REFERENCE / version
    if not (d / "cases.json").is_file():
        pytest.skip(f"THUDM reference data not found at {d}")
    return d


def reference_cases(version: str) -> dict:
    return json.loads((reference_dir(version) / "cases.json").read_text(encoding="utf-8"))


def reference_tokenizer(version: str):
    from common.models.tokenization_chatglm import ChatGLM1Tokenizer, ChatGLMTokenizer

    d = reference_dir(version)
    if version == "chatglm1":
        return ChatGLM1Tokenizer(str(d / "ice_text.model"))
    return ChatGLMTokenizer(str(d / "tokenizer.model"), chat_roles=version == "chatglm3")


def run_job(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a job script the way a user does; returns the finished process (text output)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
