"""The chat model deployment: one loaded model per replica, many concurrent token streams."""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve

from common.data import Conversation

log = logging.getLogger("ray.serve")


class ChatModel:
    def __init__(self, model: str, bits: int = 16, dtype: str = "auto", device: str = "auto",
                 template: str | None = None, trust_remote_code: bool = False, tracking_uri: str | None = None):
        import torch

        import common  # noqa: F401 - registers ChatGLM-6B with the Auto classes
        from common.loader import detect, load_model, load_tokenizer, open_model_folder
        from common.templates import get_template
        from serving.model_source import local_model_folder

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("GLMOPS_SERVE_THREADS", "2"))))
        folder = local_model_folder(model, tracking_uri)
        info = detect(folder, model) if folder.is_dir() else open_model_folder(model)
        torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16,
                       "fp16": torch.float16, "fp32": torch.float32}[dtype]
        self.model = load_model(info, bits=bits, dtype=torch_dtype, device=device,
                                trust_remote_code=trust_remote_code).eval()
        self.tok = load_tokenizer(info, trust_remote_code)
        self.template = get_template(template or info.template)
        self.name = model
        self.active_streams = 0
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", None)
                               or getattr(self.model.config, "max_sequence_length", 2048))
        log.info("serving %s (%s, template %s, %s-bit, %s)", model, info.family, self.template.name, bits, device)

    def info(self) -> dict[str, Any]:
        return {"id": self.name, "template": self.template.name, "max_context": self.max_context,
                "active_streams": self.active_streams}

    def count_prompt(self, conv: dict) -> int:
        return len(self._prompt(conv))

    def _prompt(self, conv: dict) -> list[int]:
        return self.template.prompt(self.tok, Conversation(history=[tuple(h) for h in conv["history"]],
                                                           query=conv["query"], system=conv.get("system")))

    async def stream(self, conv: dict, sampling: dict):
        from serving.streaming import Sampling, stream_reply

        ids = self._prompt(conv)
        self.active_streams += 1
        try:
            async for chunk in stream_reply(self.model, self.tok, ids, self.template.stop_token_ids(self.tok),
                                            Sampling(**sampling), clean=self.template.clean_reply):
                yield chunk
        finally:
            self.active_streams -= 1


def deployment(num_replicas: int, max_ongoing: int, num_gpus: float):
    return serve.deployment(ChatModel, name="ChatModel", num_replicas=num_replicas,
                            max_ongoing_requests=max_ongoing,
                            ray_actor_options={"num_cpus": 0.5, "num_gpus": num_gpus})
