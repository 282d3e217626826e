"""Which loss a run trains with, chosen once from its typed config: the worker's loop is the same for every stage."""

from __future__ import annotations

import torch

from common.config import FinetuneConfig
from common.training.preference import DEFAULT_BETA, PreferenceLoss, PreferenceSettings
from common.training.sft import CausalLMLoss


def preference_settings(cfg: FinetuneConfig) -> PreferenceSettings:
    beta = cfg.pref_beta if cfg.pref_beta is not None else DEFAULT_BETA[cfg.pref_loss]
    return PreferenceSettings(cfg.pref_loss, beta, cfg.simpo_margin, cfg.orpo_weight)


def training_loss(cfg: FinetuneConfig, model, autocast_dtype: torch.dtype | None) -> CausalLMLoss:
    """`--stage sft`: next-token loss over the answers; `--stage dpo`: the preference loss over pairs."""
    if cfg.stage == "dpo":
        return PreferenceLoss(model, autocast_dtype, preference_settings(cfg))
    return CausalLMLoss(model, autocast_dtype)

