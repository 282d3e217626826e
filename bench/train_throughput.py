"""QLoRA training throughput: the seed's way against our worker's step, side by side on the same data.

    python3 bench/train_throughput.py --tokenizer .gpuassets/tokenizer.model --out $OUT/train_throughput.json
    python3 bench/train_throughput.py --levers ...   # also each lever of our path on its own (bench/NOTES.md)
    python3 bench/train_throughput.py --smoke        # the script itself on CPU with the tiny model
    python3 bench/train_throughput.py --family chatglm --tokenizer .gpuassets/ice_text.model \
        --out $OUT/train_chatglm1.json               # ChatGLM-6B: its own model code, 2D positions, prefix mask
    python3 bench/train_throughput.py --family glm4 --paths ours,ours_small --out $OUT/train_glm4.json
                                                     # GLM-4-9B-0414 (Glm4ForCausalLM); glm4-chat: glm-4-9b-chat
    python3 bench/train_throughput.py --tokenizer .gpuassets/tokenizer.model --paths ours,ours_dpo,ours_simpo \
        --out $OUT/train_dpo.json                    # preference tuning against SFT, per trained token

Model: a random-weight ChatGLM2-6B (6.24 B parameters) saved once, loaded in 4-bit NF4 with double
quantization and bf16 compute. Data: instruction records whose lengths follow the seed benchmark's mix
(lognormal, median 180 tokens, clipped to 16-1024, seed 0), tokenized with the ChatGLM2 tokenizer and
template (real ids, prompt tokens masked from the loss). Every path sees the same examples in the same
order, `--examples_per_step` per optimizer step, with the same LoRA (r=8 on q/k/v, alpha 32, dropout
0.05, identical initial weights), AdamW (lr 1e-3, no decay) and clipping at 1.0.

  baseline    the seed's way: HF model + peft + bitsandbytes, prepare_model_for_kbit_training (fp32 for
              the non-quantized weights, gradient checkpointing on every layer), micro-batches of 8
              padded to the longest, HF's loss (fp32 logits of the whole micro-batch) normalised over
              the step's supervised tokens
  ours        `common.training.worker.train_step`, the function the Ray worker runs, with the worker's defaults
  ours_small  the same within `gpu_memory_gib: 16` (auto checkpointing plans for it; the cap is enforced)
  ours_dpo    `--stage dpo` (sigmoid loss, reference = adapter off in the same step) on pairs: each record of the
              mix with a second answer of the same length mix; a step takes `--examples_per_step` pairs, and every
              token of both sequences counts (ours_simpo: no reference pass); ours_dpo_cached: the steps of a later
              epoch, whose pairs' reference log-probabilities were kept from the first (filled before the timing)

Each path runs in its own process (clean peak memory). Reported: real tokens/s (pads excluded) over
the steps after the warm-up, peak GiB allocated, MFU at 4N FLOP per token (frozen base: forward 2N plus
input gradients 2N) against the measured 790 TFLOP/s bf16 of an H200, and the per-step losses, which
must match the baseline's (the same objective).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 790e12  # bf16 dense, measured on the H200 (issue #8)
QKV = {"chatglm2": ["q_proj", "k_proj", "v_proj"], "chatglm": ["query_key_value"],
       "glm4": ["q_proj", "k_proj", "v_proj"], "glm4-chat": ["q_proj", "k_proj", "v_proj"]}
LORA = {"r": 8, "alpha": 32.0, "dropout": 0.05}
LR = 1e-3
SEED_MICRO_BATCH = 8

# Our path's settings per named run; `--levers` adds the one-at-a-time variants.
PATHS = {
    "ours": {},
    "ours_small": {"gpu_memory_gib": 16},
    "ours_small_4096": {"gpu_memory_gib": 16, "max_tokens_per_batch": 4096},
    "ours_small_8192": {"gpu_memory_gib": 16, "max_tokens_per_batch": 8192},  # the rows 16 GiB took before round 4
    "ours_16384": {"max_tokens_per_batch": 16384},
    "ours_dpo": {"stage": "dpo"},
    "ours_dpo_cached": {"stage": "dpo", "reference": "cached"},
    "ours_simpo": {"stage": "dpo", "pref_loss": "simpo"},
    # the job's own LoRA (r=64 on every linear layer, alpha 16, dropout 0.1) in the benchmark's step
    "ours_job_lora": {"lora_r": 64, "lora_alpha": 16.0, "lora_dropout": 0.1, "lora_target": ["auto"]},
}
# the job's LoRA with its dropout drawn again in backward, or kept (the two planned alike: as for eager layers)
PATHS |= {
    f"ours_job_lora_dropout_{how}": {**PATHS["ours_job_lora"], "redraw_dropout": how == "redrawn"}
    for how in ("redrawn", "kept")
}
LEVERS = {
    "ours: checkpoint every layer": {"gradient_checkpointing": "true"},
    "ours: dense block mask (SDPA) instead of varlen": {"varlen": False},
    "ours: full logits instead of chunked loss": {"loss_chunk": 0},
    "ours: fp32 non-quantized weights": {"fp32_rest": True},
    "ours: pad-to-longest, micro-batch 8": {"packing": False},
    "ours: token budget 2048": {"max_tokens_per_batch": 2048},
    "ours: boolean-mask loss gather (a host sync per micro-batch)": {"host_index": False},
    "ours: AdamW's per-tensor loop instead of the fused kernel": {"fused_adamw": False},
    "ours: transformers builds its packed-row mask (unused by varlen; a host sync)": {"build_masks": True},
    "ours: eager decoder layers (no torch.compile)": {"torch_compile": "false"},
    "ours: layers compiled for any shape up front (dynamic=True)": {"compile_dynamic": True},
    "ours: layers compiled with automatic dynamic shapes": {"compile_dynamic": None},
    "ours: each step's loss read before the next step's batches are built": {"overlap": False},
    "ours: token budget 16384": {"max_tokens_per_batch": 16384},
    "ours: LoRA dropout kept for backward (PyTorch's dropout in the compiled layers)": {"redraw_dropout": False},
    "ours: LoRA dropout drawn again in backward (less memory)": {"redraw_dropout": True},
}


def chosen_levers(words: str) -> dict[str, dict]:
    """The levers whose name contains one of the comma-separated `words` (all of them for none)."""
    wanted = [w.strip() for w in words.split(",") if w.strip()]
    chosen = {k: v for k, v in LEVERS.items() if not wanted or any(w in k for w in wanted)}
    if not chosen:
        raise SystemExit(f"--levers {words!r} names none of: " + "; ".join(LEVERS))
    return chosen


# -- data --------------------------------------------------------------------------------------------------

from bench import portable_command  # noqa: E402
from bench.make_length_mix_data import CHARS as COMMON_CHARS  # noqa: E402

CHARS = COMMON_CHARS[:155]  # the 155 most common characters (~1 token each): the set the committed results used


def lengths(n: int, seed: int = 0) -> list[int]:
    """The seed benchmark's instruction-length mix: lognormal, median 180 tokens, clipped to [16, 1024]."""
    r = random.Random(seed)
    return [max(16, min(1024, int(math.exp(r.gauss(math.log(180), 0.8))))) for _ in range(n)]


def make_records(n: int, overhead: int = 12) -> list[dict]:
    """Instruction records of the mixed lengths (about one token per character, `overhead` for the template)."""
    r = random.Random(1)
    records = []
    for total in lengths(n):
        q = max(2, int(total * r.uniform(0.2, 0.5)))
        a = max(2, total - q - overhead)
        records.append({"instruction": "".join(r.choice(CHARS) for _ in range(q)), "input": "",
                        "output": "".join(r.choice(CHARS) for _ in range(a))})
    return records


def make_pair_examples(tok, n: int, family: str = "chatglm2"):
    """The records as preference pairs: the record's answer is chosen; a second answer drawn from the same length
    mix (seed 2) is rejected. Encoded as the data pipeline stores pairs (chosen, then rejected)."""
    from bench.gpu_models import template_of
    from common.templates import get_template
    from common.training.tokenize_cache import EncodeSpec, encode_record

    r = random.Random(2)
    other = make_records(n)
    r.shuffle(other)
    spec = EncodeSpec(None, template_of(family), 1024, 1024, False, pairs=True)
    template = get_template(template_of(family))
    return [encode_record({"instruction": a["instruction"], "chosen": a["output"], "rejected": b["output"]},
                          tok, template, spec)[0] for a, b in zip(make_records(n), other)]


def make_examples(tok, n: int, family: str = "chatglm2"):
    """The records encoded with the family's template (prompt tokens masked from the loss)."""
    from bench.gpu_models import template_of
    from common.templates import get_template
    from common.training.examples import encode_records

    return encode_records(make_records(n), tok, get_template(template_of(family)), 1024, 1024).examples


# -- model -------------------------------------------------------------------------------------------------

def build_checkpoint(folder: Path, tokenizer: str, smoke: bool, family: str = "chatglm2") -> None:
    if (folder / "config.json").exists():
        return
    t0 = time.time()
    if smoke:
        from common.models.tiny_model import build_tiny_model

        build_tiny_model(str(folder), str(ROOT / "data/sample.json"))
    else:
        from bench.gpu_models import GLM4_FAMILIES, build

        if family in GLM4_FAMILIES:  # a stand-in vocabulary in GLM-4's format (bench/gpu_models.py)
            build(family, folder, None)
            print(f"model saved to {folder} in {time.time() - t0:.0f} s", flush=True)
            return
        tok_dir = folder.parent / "tokenizer"
        tok_dir.mkdir(parents=True, exist_ok=True)
        link = tok_dir / ("ice_text.model" if family == "chatglm" else "tokenizer.model")
        if not link.exists():
            link.symlink_to(Path(tokenizer).resolve())
        build(family, folder, tok_dir)
    print(f"model saved to {folder} in {time.time() - t0:.0f} s", flush=True)


def param_count(folder: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import common.models  # noqa: F401 - registers ChatGLM-6B with the Auto classes
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def reinit_lora(model, seed: int = 0) -> None:
    """Identical starting adapters in every path, whatever RNG the loaders consumed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            continue
        if "lora_A" in name:
            bound = 1 / math.sqrt(p.shape[1])
            p.data.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
        elif "lora_B" in name:
            p.data.zero_()


def seed_model(folder: Path, device, family: str):
    """The seed's model: HF + bitsandbytes NF4, prepare_model_for_kbit_training, peft LoRA on q/k/v."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import common.models  # noqa: F401 - registers ChatGLM-6B with the Auto classes

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                            target_modules=QKV[family], task_type="CAUSAL_LM"))


def our_cfg(folder: Path, settings: dict, gpu_bytes: int | None = None, family: str = "chatglm2"):
    """The worker's config: the job's defaults (its large-data batching for a card of `gpu_bytes`, chosen as
    the job's driver does, for this LoRA), the benchmark's LoRA, and the run's settings."""
    from dataclasses import fields, replace

    import torch

    from common.config import FinetuneConfig
    from common.training.memory import large_data_batching, loss_chunk_for, model_shape
    from common.training.worker import layer_activations

    names = {f.name for f in fields(FinetuneConfig)}
    if gpu_bytes and settings.get("gpu_memory_gib"):
        gpu_bytes = min(gpu_bytes, int(settings["gpu_memory_gib"] * 2**30))
    base = dict(warmup_steps=0, logging_steps=50, base_model=str(folder), local_files_only=True, lora_r=LORA["r"],
                lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_target=QKV[family], max_source_length=1024,
                max_target_length=1024, per_device_train_batch_size=SEED_MICRO_BATCH)
    # A run's settings override the benchmark's (e.g. the token-budget lever's max_tokens_per_batch).
    cfg = replace(FinetuneConfig(), **{**base, **{k: v for k, v in settings.items() if k in names}})
    shape = model_shape(folder) if gpu_bytes else None
    tokens, accumulation = large_data_batching(shape, 4, gpu_bytes, loss_chunk_for(shape) if shape else 2048,
                                               layer_activations(cfg, family, torch.device("cuda")))
    return replace(cfg, max_tokens_per_batch=settings.get("max_tokens_per_batch", tokens),
                   gradient_accumulation_steps=accumulation)


# -- one path, in its own process ------------------------------------------------------------------------

def run_path(name: str, settings: dict, args) -> dict:
    from dataclasses import replace

    import numpy as np
    import torch

    from common.models.loader import load_tokenizer, open_model_folder
    from common.templates import IGNORE
    from common.training.compiling import compile_layers, recompute_lora_dropout
    from common.training.epochs import InMemoryExamples
    from common.training.memory import expandable_segments
    from common.training.objectives import training_loss
    from common.training.packing import pack, packed_batch, packed_rows, padded_batch
    from common.training.sft import batch_loss_sum
    from common.training.worker import (
        CausalLMLoss,
        build_model,
        compute_dtype,
        example_positions_for,
        make_optimizer,
        train_step,
    )

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    expandable_segments()  # as the job does
    folder = Path(args.workdir) / "model"
    tok = load_tokenizer(open_model_folder(str(folder), local_files_only=True))
    E = args.examples_per_step
    pairs = settings.get("stage") == "dpo"
    examples = (make_pair_examples if pairs else make_examples)(tok, E * args.steps, args.family)
    part = InMemoryExamples(examples).load_part(0) if pairs else None
    steps = [list(range(s * E, (s + 1) * E)) for s in range(args.steps)]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if name == "baseline":
        model = seed_model(folder, device, args.family)
        reinit_lora(model)
        params = [p for p in model.parameters() if p.requires_grad]

        def prepare(idx: list[int]) -> list:
            groups = [idx[i:i + SEED_MICRO_BATCH] for i in range(0, len(idx), SEED_MICRO_BATCH)]
            return [padded_batch(examples, g, tok.pad_token_id or 0).to(device) for g in groups]

        def run(batches: list) -> tuple[float, int, int]:
            model.train()
            n_targets = sum(b.num_targets for b in batches)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for b in batches:
                # HF's own loss: labels unshifted (the model shifts), fp32 logits of the whole micro-batch
                labels = torch.cat([torch.full_like(b.targets[:, :1], IGNORE), b.targets[:, :-1]], dim=1)
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels,
                            num_items_in_batch=n_targets)
                out.loss.backward()
                total += out.loss.detach() * n_targets
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(total) / n_targets, sum(b.num_tokens for b in batches), max(b.input_ids.numel() for b in batches)
    else:
        overlap = settings.get("overlap", True)
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        cfg = our_cfg(folder, settings, gpu_bytes, args.family)
        # compiled here instead of by build_model, with the lever's setting (plans as for eager layers)
        own_compile = "compile_dynamic" in settings or "redraw_dropout" in settings
        if own_compile:
            cfg = replace(cfg, torch_compile="false")
        model, _, _ = build_model(cfg, device)
        if own_compile and device.type == "cuda":
            if settings.get("redraw_dropout", True):
                recompute_lora_dropout(model)
            model.compiled_layers = compile_layers(model, dynamic=settings.get("compile_dynamic"))
        if settings.get("fp32_rest"):
            for p in model.parameters():
                if not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                    p.data = p.data.float()
        reinit_lora(model)
        dtype = compute_dtype(device, cfg)
        if pairs:  # the job's preference loss, as the worker chooses it
            loss_fn = training_loss(cfg, model, dtype if dtype != torch.float32 else None)
        else:
            loss_fn = CausalLMLoss(model, dtype if dtype != torch.float32 else None,
                                   varlen=settings.get("varlen", True), build_masks=settings.get("build_masks", False),
                                   **({"loss_chunk": settings["loss_chunk"]} if "loss_chunk" in settings else {}))
        params = [p for p in model.parameters() if p.requires_grad]
        sched = None
        positions = example_positions_for(args.family, model.get_base_model().config)

        def prepare(idx: list[int]) -> list:
            if pairs:  # whole pairs per row, each as its chosen and rejected sequence
                batches = []
                for row in pack(examples, idx, cfg.max_tokens_per_batch):
                    batches.append(packed_rows([s for i in row for s in part.sequences(i)], cfg.max_tokens_per_batch,
                                               positions))
                    batches[-1].examples = np.asarray(row)  # what the reference cache keys on
            elif cfg.packing:
                batches = [packed_batch(examples, row, cfg.max_tokens_per_batch, positions)
                           for row in pack(examples, idx, cfg.max_tokens_per_batch)]
            else:
                batches = [padded_batch(examples, idx[i:i + SEED_MICRO_BATCH], tok.pad_token_id or 0)
                           for i in range(0, len(idx), SEED_MICRO_BATCH)]
            batches = [b.to(device, non_blocking=overlap) for b in batches]
            if settings.get("host_index", True) is False:
                for b in batches:
                    b.supervised = None
            return batches

        def run(batches: list):
            n_targets = sum(loss_fn.units_of(b) for b in batches)  # the loss's units: tokens, or pairs
            out = train_step(loss_fn, opt, sched, batches, n_targets, 1, 1.0)
            loss = out["loss_sum"] / n_targets
            return loss if overlap else float(loss), sum(b.num_tokens for b in batches), max(b.input_ids.numel() for b in batches)

    if name == "baseline":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    else:  # the worker's optimizer (fused on CUDA)
        opt = make_optimizer(params, LR, 0.0, **({"fused": False} if settings.get("fused_adamw") is False else {}))
    if name != "baseline":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    plan = getattr(model, "checkpointing_plan", "all layers (prepare_model_for_kbit_training)")
    if name == "baseline":
        attention = "sdpa, padding mask"
    elif settings.get("packing", True) is False:
        attention = "sdpa, padding mask"
    else:
        from common.training.attention import varlen_available

        use = settings.get("varlen", True) and varlen_available(device, torch.bfloat16)
        attention = "varlen (per example)" if use else "sdpa, block-diagonal mask"
        if args.family == "chatglm":
            attention = "flex attention, prefix block mask" if device.type == "cuda" else "dense prefix mask"
    # The worker's order: the next step's batches are built and uploaded while the GPU still runs this step,
    # and losses are read afterwards ("overlap": False reads each step's loss first, as before).
    if settings.get("reference") == "cached":  # as the first epoch leaves it: every pair's reference known
        loss_fn.train()  # the loss keeps training pairs' references (not eval ones)
        cuda = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # the timed steps draw the dropout they would
            for idx in steps:
                for b in prepare(idx):
                    batch_loss_sum(loss_fn, b)
        loss_fn.pop_sums()
        loss_fn.end_epoch()
    losses, tokens, t0 = [], 0, None
    biggest = 0
    recompiles = watch_recompiles()
    marks = StepMarks(device)
    phases = watch_memory_phases(loss_fn, device, recompiles) if pairs else []
    ready = prepare(steps[0])
    for k in range(len(steps)):
        if k == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.time(), 0
        recompiles.step = k
        marks.mark()
        loss, n, widest = run(ready)
        if k + 1 < len(steps):
            ready = prepare(steps[k + 1])
        biggest = max(biggest, widest)
        losses.append(loss)
        tokens += n
    marks.mark()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    logging.getLogger("torch._dynamo").removeHandler(recompiles)
    losses = [round(float(x), 5) for x in losses]
    step = lambda idx: run(prepare(idx))  # noqa: E731
    profile = profile_steps(step, steps[:args.profile], device) if args.profile else None
    tps = tokens / seconds
    n_params = param_count(folder)
    peak = marks.overall_peak() / 2**30 if device.type == "cuda" else float("nan")
    from torch._dynamo.utils import counters

    return {"name": name, "settings": settings, "tokens_per_s": round(tps), "peak_gib": round(peak, 2),
            "compiled_layers": getattr(model, "compiled_layers", 0),
            "compiled_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "mfu": round(tps * 4 * n_params / PEAK_FLOPS, 4), "step_s": round(seconds / (len(steps) - args.warmup), 3),
            "timed_steps": len(steps) - args.warmup, "timed_tokens": tokens, "checkpointing": plan,
            "largest_micro_batch_tokens": biggest, "attention": attention,
            "params": n_params, "losses": losses, "step_ms": marks.milliseconds(),
            "recompiles": recompiles.seen, "step_peak_gib": marks.peaks, "memory_phases": phases,
            **({"profile": profile} if profile else {})}


class StepMarks:
    """Each step's time on the GPU's stream (an event at every step's start, read once at the end: no step waits
    for the GPU), so a slow step (a compile, an allocator's growth) shows where it happened."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.events, self.times = [], []
        self._torch = torch
        self.peaks: list[float] = []   # each step's peak allocated GiB (the allocator's books: no sync)
        self._peak_before = 0          # the largest step peak so far: each mark resets the allocator's

    def mark(self) -> None:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
            step_peak = self._torch.cuda.max_memory_allocated()
            if self.events[1:]:
                self.peaks.append(round(step_peak / 2**30, 2))
            self._peak_before = max(self._peak_before, step_peak)
            self._torch.cuda.reset_peak_memory_stats()
        else:
            self.times.append(time.time())

    def overall_peak(self) -> int:
        return max(self._peak_before, self._torch.cuda.max_memory_allocated()) if self.cuda else 0

    def milliseconds(self) -> list[float]:
        if self.cuda:
            return [round(a.elapsed_time(b), 1) for a, b in zip(self.events, self.events[1:])]
        return [round(1e3 * (b - a), 1) for a, b in zip(self.times, self.times[1:])]


def watch_memory_phases(loss_fn, device, clock, steps: int = 3) -> list[dict]:
    """GiB allocated before and after the reference and policy passes of a preference step's micro-batches (the
    first `steps` steps), and the step's peak so far after each: what a pass leaves behind for the next."""
    import torch

    seen: list[dict] = []
    if device.type != "cuda":
        return seen

    def wrap(name):
        fn = getattr(loss_fn, name)

        def watched(*a, **k):
            before = torch.cuda.memory_allocated()
            out = fn(*a, **k)
            if clock.step < steps:
                seen.append({"step": clock.step, "pass": name, "before_gib": round(before / 2**30, 2),
                             "after_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                             "step_peak_so_far_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
                print("MEM " + json.dumps(seen[-1]), flush=True)
            return out
        setattr(loss_fn, name, watched)

    for name in ("reference_logps", "sequence_logps"):
        wrap(name)
    return seen


def watch_recompiles():
    """Dynamo's recompilations while the steps run, each with its step and the guard that failed."""
    import torch

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.step, self.seen = -1, []

        def emit(self, record):
            lines = record.getMessage().splitlines()
            if lines and lines[0].startswith("Recompiling"):
                # one failed guard per graph compiled so far ("- 0/2: ..."), the trace lines left out
                why = [ln.strip()[2:].split("#")[0].strip() for ln in lines[1:]
                       if ln.strip().startswith("- ") and ln.strip()[2:3].isdigit()]
                self.seen.append({"step": self.step, "function": lines[0][len("Recompiling function "):][:80],
                                  "guards": why[:6]})

    torch._logging.set_logs(recompiles=True)
    handler = Seen()
    logging.getLogger("torch._dynamo").addHandler(handler)
    return handler


# Host-side calls that wait for the GPU (each one drains the queue of launched kernels).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::tolist")


def python_sync_callers(step, batches: list) -> list[dict]:
    """Who reads tensor values on the host (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`: on a CUDA tensor
    each waits for the GPU): one more step with those wrapped, counted by the two innermost frames outside torch."""
    import traceback

    import torch

    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def wrap(name, fn):
        def counted(self, *a, **k):
            frames = [f"{Path(fr.filename).name}:{fr.lineno} {fr.name}" for fr in traceback.extract_stack()[:-1]
                      if "/torch/" not in fr.filename][-2:]
            where = self.device.type
            key = f"{name} ({where}) <- " + " <- ".join(reversed(frames))
            counts[key] = counts.get(key, 0) + 1
            return fn(self, *a, **k)
        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        for idx in batches:
            step(idx)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    n = max(len(batches), 1)
    return [{"call": k[:300], "per_step": round(v / n, 1)} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8]]


def profile_steps(step, batches: list, device) -> dict:
    """Where a step's time goes: GPU kernel time against wall time, launches, host syncs, top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.time()
        for idx in batches:
            step(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.time() - t0
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.device_time for e in kernels) / 1e6  # microseconds; kernels of one stream do not overlap
    count = lambda names: sum(e.count for e in events if e.key.startswith(names))  # noqa: E731
    n = len(batches)
    top_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:15]
    top_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    sync_callers = python_sync_callers(step, batches[:1])
    return {
        "sync_callers": sync_callers,
        "steps": n, "wall_s_per_step": round(wall / n, 4), "gpu_kernel_s_per_step": round(gpu_s / n, 4),
        "gpu_busy": round(gpu_s / wall, 3) if wall else None,
        "kernel_launches_per_step": round(len(kernels) / n),
        "host_syncs_per_step": round(count(SYNC_CALLS) / n, 1),
        "sync_ops_per_step": {k: round(count((k,)) / n, 1) for k in SYNC_OPS if count((k,))},
        "top_gpu_ops": [{"op": e.key[:80], "calls_per_step": round(e.count / n, 1),
                         "ms_per_step": round(e.self_device_time_total / 1e3 / n, 2)} for e in top_gpu],
        "top_cpu_ops": [{"op": e.key[:80], "calls_per_step": round(e.count / n, 1),
                         "ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 2)} for e in top_cpu],
    }


def varlen_check(args) -> dict:
    """Packed rows through varlen attention give each example the loss it has alone (no cross-attention)."""
    import torch

    from common.models.loader import load_tokenizer, open_model_folder
    from common.training.packing import packed_batch
    from common.training.worker import CausalLMLoss, batch_loss_sum, build_model, example_positions_for

    folder = Path(args.workdir) / "model"
    tok = load_tokenizer(open_model_folder(str(folder), local_files_only=True))
    examples = make_examples(tok, 12, args.family)
    model, _, _ = build_model(our_cfg(folder, {"lora_dropout": 0.0}, family=args.family), torch.device("cuda"))
    positions = example_positions_for(args.family, model.get_base_model().config)
    loss_fn = CausalLMLoss(model, torch.bfloat16).eval()
    with torch.no_grad():
        packed = batch_loss_sum(loss_fn, packed_batch(examples, list(range(12)), 16384, positions).to("cuda"))
        alone = sum(batch_loss_sum(loss_fn, packed_batch(examples, [i], 16384, positions).to("cuda"))
                    for i in range(12))
    return {"packed_loss_sum": float(packed), "sum_of_alone": float(alone),
            "rel_diff": abs(float(packed) - float(alone)) / abs(float(alone))}


# -- the driver ----------------------------------------------------------------------------------------------

def spawn(name: str, settings: dict, args) -> dict:
    cmd = [sys.executable, __file__, "--_path", name, "--_settings", json.dumps(settings),
           "--workdir", args.workdir, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--examples_per_step", str(args.examples_per_step), "--profile", str(args.profile),
           "--family", args.family] + \
        (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (Path(args.workdir) / f"{name}.log").write_text(proc.stdout + proc.stderr)  # the whole story of a failed run
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"name": name, "settings": settings, "error": tail}


def loss_match(base: list[float], ours: list[float]) -> dict:
    diffs = [abs(a - b) for a, b in zip(base, ours)]
    return {"max_abs": round(max(diffs), 4), "mean_abs": round(sum(diffs) / len(diffs), 4),
            "first": [base[0], ours[0]], "last": [base[-1], ours[-1]]}


def table(rows: list[dict], base_tps: float) -> str:
    out = ["| path | tokens/s | x seed | peak GiB | MFU (4N) | checkpointing | loss first → last | loss vs seed (max abs) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||||")
            continue
        match = r.get("loss_vs_seed", {})
        out.append(f"| {r['name']} | {r['tokens_per_s']:,} | {r['tokens_per_s'] / base_tps:.2f} | {r['peak_gib']} | "
                   f"{100 * r['mfu']:.1f} % | {r['checkpointing']} | {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} | "
                   f"{match.get('max_abs', '-')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/glmops-bench")
    ap.add_argument("--tokenizer", help="the family's tokenizer: ChatGLM2's tokenizer.model or ChatGLM-6B's "
                                        "ice_text.model (e.g. from ../shared/reference)")
    ap.add_argument("--family", default="chatglm2", choices=["chatglm2", "chatglm", "glm4", "glm4-chat"],
                    help="the model shape (random weights, real size): ChatGLM2-6B, ChatGLM-6B, GLM-4-9B-0414 "
                         "(Glm4ForCausalLM) or glm-4-9b-chat (as converted: GlmForCausalLM)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--examples_per_step", type=int, default=32)
    ap.add_argument("--paths", default="baseline,ours,ours_small,ours_small_8192")
    ap.add_argument("--levers", nargs="?", const="", default=None, metavar="WORDS",
                    help="also run each lever of our path on its own (with comma-separated words: only the levers "
                         "whose name contains one of them)")
    ap.add_argument("--lever_steps", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not speed")
    ap.add_argument("--profile", type=int, default=0,
                    help="after the timing, run this many more steps of each path under torch.profiler and "
                         "report GPU busy time, kernel launches, host syncs and the top operators")
    ap.add_argument("--no_check", action="store_true", help="skip the varlen check (packed = alone) on the GPU")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--_path", help=argparse.SUPPRESS)
    ap.add_argument("--_settings", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._path:
        result = varlen_check(args) if args._path == "varlen_check" else run_path(args._path, json.loads(args._settings), args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch
    import transformers

    if args.smoke:
        args.steps, args.warmup, args.examples_per_step, args.lever_steps = 4, 1, 4, 3
    elif not args.tokenizer and args.family in ("chatglm2", "chatglm"):
        ap.error("--tokenizer is needed (the family's tokenizer file)")
    build_checkpoint(Path(args.workdir) / "model", args.tokenizer, args.smoke, args.family)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    def report(rows: list[dict]) -> None:
        """Each finished row at once, and in `--out` marked partial: a run cut short keeps what it measured."""
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"partial": True, "command": portable_command("train_throughput.py", args),
                                                  "gpu": gpu, "runs": rows}, indent=1))

    rows = []
    for name in args.paths.split(","):
        settings = {} if name == "baseline" else PATHS[name]
        rows.append(spawn(name, settings, args))
        report(rows)
    if args.levers is not None:
        full_steps = args.steps
        args.steps = args.lever_steps
        for name, settings in chosen_levers(args.levers).items():
            rows.append(spawn(name, settings, args))
            report(rows)
        args.steps = full_steps
    check = spawn("varlen_check", {}, args) if torch.cuda.is_available() and not (args.smoke or args.no_check) else None

    by = {r["name"]: r for r in rows}
    base = by.get("baseline")
    for r in rows:
        if base and "error" not in base and "error" not in r and r is not base:
            n = min(len(base["losses"]), len(r["losses"]))
            r["loss_vs_seed"] = loss_match(base["losses"][:n], r["losses"][:n])
    base_tps = base["tokens_per_s"] if base and "error" not in base else float("nan")
    print()
    print(table(rows, base_tps))
    sft = by.get("ours")
    for r in rows:
        if r["name"].startswith(("ours_dpo", "ours_simpo")) and sft and "error" not in sft and "error" not in r:
            r["vs_sft"] = round(r["tokens_per_s"] / sft["tokens_per_s"], 3)
            print(f"{r['name']}: {r['vs_sft']:.2f} x the SFT step's tokens/s (every token of chosen and rejected "
                  f"counted; {r['peak_gib']} GiB peak vs {sft['peak_gib']})")
    for r in rows:
        if "step_ms" in r:
            ms, timed = r["step_ms"], sorted(r["step_ms"][args.warmup:])
            late = [c for c in r["recompiles"] if c["step"] >= args.warmup]
            print(f"{r['name']}: step ms first {ms[:3]}, timed median {timed[len(timed) // 2] if timed else '-'} "
                  f"(min {timed[0] if timed else '-'}, max {timed[-1] if timed else '-'}); {len(r['recompiles'])} "
                  f"recompiles, {len(late)} during the timed steps" + (f", e.g. {late[0]}" if late else ""))
    for r in rows:
        if r.get("profile"):
            p = r["profile"]
            print(f"\nprofile of {r['name']} ({p['steps']} steps): {p['wall_s_per_step']} s per step, GPU kernels "
                  f"{p['gpu_kernel_s_per_step']} s ({p['gpu_busy']:.0%} busy), {p['kernel_launches_per_step']} "
                  f"launches and {p['host_syncs_per_step']} host syncs per step; sync ops {p['sync_ops_per_step']}")
            for o in p["top_gpu_ops"][:10]:
                print(f"  {o['ms_per_step']:>9.2f} ms  x{o['calls_per_step']:<7} {o['op']}")
            for c in p.get("sync_callers", []):
                print(f"  sync x{c['per_step']:<6} {c['call']}")
    if check:
        print(f"\nvarlen check: loss of 12 packed examples {check.get('packed_loss_sum')} vs alone "
              f"{check.get('sum_of_alone')} (relative difference {check.get('rel_diff')})")

    def get(name, *keys):
        r = by.get(name, {})
        return {k: r.get(k) for k in keys}

    summary = {
        "baseline": get("baseline", "tokens_per_s", "peak_gib", "mfu"),
        "ours": get("ours", "tokens_per_s", "peak_gib", "mfu"),
        "ours_small": get("ours_small", "tokens_per_s", "peak_gib", "mfu"),
        "ratio": round(by["ours"]["tokens_per_s"] / base_tps, 2) if "ours" in by and "error" not in by["ours"] else None,
        "command": portable_command("train_throughput.py", args),
        "gpu": gpu, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "steps": args.steps, "warmup": args.warmup, "examples_per_step": args.examples_per_step,
        "varlen_check": check, "runs": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
        print(f"\nwrote {args.out}")
    gc.collect()


if __name__ == "__main__":
    main()
