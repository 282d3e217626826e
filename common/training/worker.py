"""The fine-tuning worker: model + LoRA → micro-batches → optimizer steps → eval → checkpoints.

`train_loop_per_worker` is what Ray Train runs on every worker; `train_step` is the inner step, kept
separate so the throughput benchmark runs exactly the same code.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import FinetuneConfig
from common.data import Conversation
from common.generation import generate_replies, generations_table
from common.metrics import SCORES, average, score
from common.tool_eval import reference_text, scored_texts
from common.training.compiling import compile_layers, eager, recompute_lora_dropout, wants_compile
from common.training.epochs import (
    BatchReader,
    ParquetExamples,
    all_batches,
    plan_epoch,
    step_micro_batches,
    steps_in,
)
from common.training.memory import expandable_segments, loss_chunk_for
from common.training.objectives import training_loss
from common.training.packing import Batch, Positions, counted
from common.training.preference import REFERENCE_ADAPTER
from common.training.sft import (  # noqa: F401 - the benchmark and tests import the SFT loss from here too
    CausalLMLoss,
    batch_loss_sum,
    chunked_cross_entropy_sum,
)

LORA_TARGETS = {
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "native": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
}


# -- model ---------------------------------------------------------------------------------------------

def compute_dtype(device: torch.device, cfg: FinetuneConfig) -> torch.dtype:
    """bf16 where the device has it, fp16 only when asked, else fp32 (CPU)."""
    if device.type == "cuda":
        if cfg.fp16:
            return torch.float16
        if cfg.bf16 is False or not torch.cuda.is_bf16_supported():
            return torch.float32
        return torch.bfloat16
    return torch.float32


def lora_targets(cfg: FinetuneConfig, family: str) -> list[str] | str:
    targets = cfg.lora_target
    if targets in (["auto"], "auto"):
        if family == "chatglm":
            return LORA_TARGETS["chatglm"]
        return LORA_TARGETS["native"] if family in ("chatglm2", "chatglm3", "glm4") else "all-linear"
    if targets in (["all-linear"], "all-linear"):
        return "all-linear"
    return list(targets)


def layer_activations(cfg: FinetuneConfig, family: str, device: torch.device):
    """What the memory plan needs to know of a layer besides its shape: the LoRA modules, and compiled or not."""
    from common.training.memory import LayerActivations

    targets = lora_targets(cfg, family)
    compiled = wants_compile(cfg.torch_compile, device)
    # compiled layers can draw LoRA's dropout again in backward: the leanest layer, which the rows are chosen
    # for; build_model keeps the dropout instead where the card has room (memory.keep_dropout_where_it_fits)
    return LayerActivations(targets if isinstance(targets, str) else tuple(targets), cfg.lora_dropout, compiled,
                            dropout_recomputed=compiled)


def example_positions_for(family: str, config) -> Positions:
    """How a packed row numbers its examples' tokens: ChatGLM-6B's 2D positions and prompt lengths (its prefix
    mask), else 0, 1, 2 ... per example."""
    if family == "chatglm":
        from common.models.modeling_chatglm1 import example_positions

        return functools.partial(example_positions, config=config)
    return counted


def tokens_per_micro_batch(cfg: FinetuneConfig) -> int:
    if cfg.packing:
        return cfg.max_tokens_per_batch
    return cfg.per_device_train_batch_size * (cfg.max_source_length + cfg.max_target_length)


def build_model(cfg: FinetuneConfig, device: torch.device):
    """Base model through the one loader, then LoRA. Returns (peft model, tokenizer, model info);
    `model.checkpointing_plan` says which layers recompute their activations and why, `model.compiled_layers`
    how many decoder layers run through torch.compile."""
    from peft import LoraConfig, get_peft_model

    from common.models.loader import load_model, load_tokenizer, open_model_folder
    from common.training.memory import (
        apply_checkpointing,
        cap_memory,
        free_on_gpu,
        keep_dropout_where_it_fits,
        plan_checkpointing,
    )

    cap_memory(device, cfg.gpu_memory_gib)

    info = open_model_folder(cfg.base_model, revision=cfg.revision, cache_dir=cfg.cache_dir,
                             local_files_only=cfg.local_files_only)
    dtype = compute_dtype(device, cfg)
    model = load_model(info, bits=cfg.bits, dtype=dtype, device=str(device),
                       trust_remote_code=cfg.trust_remote_code,
                       quant_type=cfg.quant_type, double_quant=cfg.double_quant)
    model.config.use_cache = False
    tokens = tokens_per_micro_batch(cfg)
    # what the plan assumes is what is built below
    layer = keep_dropout_where_it_fits(layer_activations(cfg, info.family, device), model.config, tokens,
                                       free_on_gpu(device, cfg.gpu_memory_gib, model.config,
                                                   loss_chunk_for(model.config)))
    n_ckpt, plan = plan_checkpointing(str(cfg.gradient_checkpointing), model.config, device, tokens,
                                      cfg.gpu_memory_gib, loss_chunk_for(model.config), layer)
    if layer.compiled and layer.lora_dropout > 0:
        plan += ("; LoRA's dropout drawn again in backward (less memory)" if layer.dropout_recomputed
                 else "; LoRA's dropout kept for backward (room enough)")
    apply_checkpointing(model, n_ckpt)
    if cfg.init_adapter:  # an earlier run's adapter to continue from (the driver checked it fits this base)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        if cfg.stage == "dpo":  # the preference losses that need one compare with it (training.preference)
            model.load_adapter(cfg.init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(cfg, info.family), task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, lora)
    if dtype != torch.float32:
        # Keep the trainable LoRA weights in fp32 for stable AdamW updates; compute runs in `dtype`.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.checkpointing_plan = plan
    model.compiled_layers = 0
    if layer.compiled:
        if layer.dropout_recomputed:
            recompute_lora_dropout(model)
        model.compiled_layers = compile_layers(model, fallback=cfg.torch_compile == "auto")
    return model, load_tokenizer(info, cfg.trust_remote_code), info


# -- one step --------------------------------------------------------------------------------------------

def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, *,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (one launch for all LoRA tensors, step counters on the device) instead
    of the per-tensor loop, which reads each tensor's step count on the host (336 `.item()` per step for
    r=8 q/k/v on 28 layers, bench/NOTES.md)."""
    if fused is None:
        fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def train_step(loss_fn, optimizer, scheduler, micro_batches: list[Batch], global_targets: int, world_size: int,
               max_grad_norm: float, loss_weight: float = 1.0) -> dict[str, float]:
    """One optimizer step over `micro_batches` (this worker's share).

    The loss is normalised by the supervised tokens of the whole step on all workers, so every token
    weighs the same whatever the packing, accumulation or worker count (DDP averages gradients, hence
    the world-size factor). `loss_weight=0` runs a pass that contributes nothing: a worker with no
    micro-batch in an epoch's short last step still has to join DDP's gradient all-reduce.

    `global_targets` counts the loss's units: supervised tokens, or preference pairs (their loss is a mean per pair).

    Returns the summed loss, the gradient norm and the stage's summed statistics (`sums`: a tensor of
    `num_stats`, empty for SFT) as tensors on the device: reading them waits for the whole step, so the caller reads
    them after it has queued what comes next (the next step's batches)."""
    loss_fn.train()
    device = micro_batches[0].input_ids.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    scale = world_size / max(global_targets, 1) * loss_weight
    for mb in micro_batches:
        loss_sum = batch_loss_sum(loss_fn, mb)
        (loss_sum * scale).backward()
        total += loss_sum.detach() * loss_weight
    stage = getattr(loss_fn, "module", loss_fn)  # under DDP, the loss module itself
    sums = stage.pop_sums()
    sums = torch.zeros(stage.num_stats, dtype=torch.float64, device=device) if sums is None else sums * loss_weight
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss_sum": total, "grad_norm": grad_norm, "sums": sums}


@torch.no_grad()
def evaluate(loss_fn: CausalLMLoss, batches: list[Batch], device) -> tuple[float, int, torch.Tensor]:
    """(summed loss, its units: supervised tokens or pairs, the stage's summed statistics) over `batches`."""
    loss_fn.eval()
    loss, n = 0.0, 0
    loss_fn.pop_sums()
    for b in batches:
        loss += batch_loss_sum(loss_fn, b.to(device)).item()
        n += loss_fn.units_of(b)
    sums = loss_fn.pop_sums()
    return loss, n, torch.zeros(loss_fn.num_stats, dtype=torch.float64) if sums is None else sums.cpu()


# -- checkpoints -----------------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_eval_loss: float | None = None
    history: list[dict] = field(default_factory=list)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, metadata: dict) -> None:
    model.save_pretrained(folder / "adapter", selected_adapters=["default"])  # not --init_adapter's frozen copy
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=1))
    (folder / "adapter" / "glmops.json").write_text(json.dumps(metadata, ensure_ascii=False, indent=2))


def load_checkpoint(folder: Path, model, optimizer, scheduler, device) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return TrainState(**json.loads((folder / "trainer_state.json").read_text()))


# -- the worker loop -------------------------------------------------------------------------------------

def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _bar(frac: float, width: int = 20) -> str:
    filled = int(round(frac * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _test_hooks(step: int, rank: int) -> str | None:
    """Test-only: GLMOPS_TEST_FAIL_AT_STEP='k:marker' kills rank 1 once at step k;
    GLMOPS_TEST_STOP_AT_STEP=k stops the run cleanly after step k (as if stopped by hand)."""
    fail = os.environ.get("GLMOPS_TEST_FAIL_AT_STEP")
    if fail:
        k, marker = fail.split(":", 1)
        if step == int(k) and rank == min(1, int(os.environ.get("GLMOPS_WORLD", "1")) - 1) and not os.path.exists(marker):
            Path(marker).write_text("failed once")
            time.sleep(5)  # let Ray's controller collect the last report first, as with real step times
            os._exit(1)  # a hard crash, as a lost worker looks to Ray
    stop = os.environ.get("GLMOPS_TEST_STOP_AT_STEP")
    if stop and step == int(stop):
        return "stop"
    return None


def _ids_in(parquet_file: str | None):
    if not parquet_file:
        return None
    import pyarrow.parquet as pq

    return pq.read_table(parquet_file, columns=["id"])["id"].to_numpy()


def _record_examples(src: ParquetExamples, plan, own: list[int], state: TrainState, rank: int) -> None:
    """Test-only: GLMOPS_TEST_EXAMPLE_LOG=dir appends the example ids each rank trains on, per step."""
    folder = os.environ.get("GLMOPS_TEST_EXAMPLE_LOG")
    if folder:
        ids = [int(src.ids[i]) for b in own for i in plan.examples(b)]
        with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": state.epoch, "step": state.step + 1, "ids": ids}) + "\n")


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's entry on every worker; rank 0 also samples its node's CPU, memory and GPU into the run."""
    import ray.train

    from common.tracking import start_system_metrics

    monitor = None
    if ray.train.get_context().get_world_rank() == 0:
        monitor = start_system_metrics(config["tracking_uri"], config["mlflow_run_id"],
                                       config["cfg"]["system_metrics_interval"])
    try:
        return _train(config)
    finally:
        if monitor is not None:
            monitor.finish()


def _train(config: dict) -> dict:
    import logging
    import warnings

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from transformers import get_scheduler

    from common.tracking import NullTracker, Tracker

    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing_enable).*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    cfg = FinetuneConfig(**config["cfg"])  # typed again on this side of the Ray boundary
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["GLMOPS_WORLD"] = str(world)
    device = ray.train.torch.get_device()
    expandable_segments()
    # Every rank says where it runs: on a cluster, which node got which worker is the first thing to check.
    print(f"worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"({socket.gethostname()}, {device})", flush=True)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    log = print if rank == 0 else (lambda *a, **k: None)

    model, tok, info = build_model(cfg, device)
    log(f"gradient checkpointing: {model.checkpointing_plan}")
    if model.compiled_layers:
        log(f"torch.compile: {model.compiled_layers} decoder layers (compiled at the first steps)")
    dtype = compute_dtype(device, cfg)
    autocast_dtype = dtype if dtype != torch.float32 else None
    packing = cfg.packing
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # Every worker reads the small columns of the whole set and computes the same epoch plan; tokens are
    # read a window at a time (common/training/epochs.py).
    data = config["data"]
    train_src = ParquetExamples(data["train_files"], exclude=_ids_in(data.get("exclude_ids_from")))
    eval_src = ParquetExamples(data["eval_files"])
    batch_kw = {"packing": packing, "max_tokens": cfg.max_tokens_per_batch}
    positions = example_positions_for(info.family, model.get_base_model().config)
    plans: dict[int, object] = {}

    def plan_for(epoch: int):
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_epoch(train_src, epoch=epoch, seed=cfg.seed,
                                      batch_size=cfg.per_device_train_batch_size, **batch_kw)
        return plans[epoch]

    accum = cfg.gradient_accumulation_steps
    per_step = world * accum
    steps_per_epoch = steps_in(plan_for(0), per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    eval_batches = all_batches(eval_src, epoch=0, seed=cfg.seed, batch_size=cfg.per_device_train_batch_size,
                               pad_id=pad_id, positions=positions, **batch_kw)[rank::world]
    log(f"data: {len(train_src):,} training examples, {len(plan_for(0)):,} micro-batches per epoch, "
        f"{steps_per_epoch:,} steps per epoch; {len(eval_src):,} eval examples")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    sched_name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                              num_training_steps=total_steps)

    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None or config.get("resume_from"):
        if restored is not None:
            with restored.as_directory() as d:
                state = load_checkpoint(Path(d), model, optimizer, scheduler, device)
                tracker.restore_unwritten(Path(d))  # metrics a tracking outage held back when it was kept
        else:
            state = load_checkpoint(Path(config["resume_from"]), model, optimizer, scheduler, device)
        log(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.step_in_epoch * per_step})")

    loss_fn = training_loss(cfg, model, autocast_dtype)
    objective = loss_fn.describe()
    if objective:
        log(objective)
    ddp = ray.train.torch.prepare_model(loss_fn, move_to_device=False) if world > 1 else loss_fn
    unwrapped = model
    metadata = dict(config["metadata"])
    template_name = cfg.template or info.template
    # A fixed sample of the eval split, replied to greedily at every eval and scored (rank 0 generates;
    # every rank reports the same scores, so any rank's report can choose the best checkpoint).
    gen_convs = [Conversation.from_dict(c) for c in config.get("generate_conversations") or []]

    def eval_generation() -> tuple[dict[str, float], str]:
        """The eval replies' mean scores (eval_<score>) and the first reply (the log's sample)."""
        if not gen_convs:
            return {}, ""
        means = torch.zeros(len(SCORES), dtype=torch.float64, device=device)
        first = ""
        if rank == 0:
            with eager():
                raw = generate_replies(unwrapped, tok, template_name, gen_convs, device, cfg.eval_max_new_tokens,
                                       raw=True)
            replies = scored_texts(template_name, gen_convs, raw)
            rows = [score(r, reference_text(c)) for r, c in zip(replies, gen_convs)]
            means += torch.tensor([average(rows)[k] for k in SCORES], dtype=torch.float64, device=device)
            first = replies[0]
            tracker.log_columns(generations_table(gen_convs, replies, rows),
                                f"eval_generations/step-{state.step:06d}.json")
        if world > 1:
            torch.distributed.all_reduce(means)
        return {f"eval_{k}": float(v) for k, v in zip(SCORES, means.tolist())}, first

    def eval_and_checkpoint(final: bool) -> None:
        # The unwrapped model: DDP would sync buffers on every forward, and ranks may hold unequal eval shares.
        loss, n, stats = evaluate(loss_fn, eval_batches, device)
        sums = torch.cat([torch.tensor([loss, n], dtype=torch.float64), stats]).to(device)
        if world > 1:
            torch.distributed.all_reduce(sums)
        measured = loss_fn.eval_metrics(float(sums[0]), float(sums[1]), sums[2:])  # eval_loss first
        eval_loss = measured.pop("eval_loss")
        scores, reply = eval_generation()
        scores = {**measured, **scores}  # perplexity, or the preference rewards; then the replies' scores
        state.best_eval_loss = eval_loss if state.best_eval_loss is None else min(state.best_eval_loss, eval_loss)
        state.history.append({"step": state.step, "eval_loss": eval_loss, "sample": reply, **scores})
        shown = "".join(f" | {label} {scores[k]:.{digits}f}" for k, label, digits in
                        (("perplexity", "ppl", 2), ("eval_rewards_accuracy", "reward accuracy", 3),
                         ("eval_rewards_margins", "margin", 3), ("eval_bleu-4_chars", "bleu-4_chars", 1),
                         ("eval_rouge-l_jieba", "rouge-l_jieba", 1)) if k in scores)
        log(f"eval   step {state.step}/{total_steps} | eval_loss {eval_loss:.4f}{shown} | sample: {reply[:80]!r}")
        tracker.log_metrics({"eval_loss": eval_loss, **scores}, state.step)
        metrics = {"eval_loss": eval_loss, **scores, "step": state.step, "epoch": state.epoch, "final": final}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                meta = {**metadata, "step": state.step, "eval_loss": eval_loss, "eval_scores": scores}
                save_checkpoint(Path(tmp), unwrapped, optimizer, scheduler, state, meta)
                tracker.save_unwritten(Path(tmp))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint-{state.step:06d}")
        tracker.flush()  # only metrics covered by a kept checkpoint are ever written

    t_start = time.time()
    start_step = state.step
    tokens_seen = 0
    steady_tokens, steady_seconds = 0, 0.0  # training steps only, after two warm-up steps: the throughput figure
    window_loss, window_targets, window_tokens, window_t0 = 0.0, 0, 0, time.time()
    window_stats = torch.zeros(loss_fn.num_stats, dtype=torch.float64)
    while state.step < total_steps:
        plan = plan_for(state.epoch)
        reader = BatchReader(train_src, plan, pad_id=pad_id, positions=positions, **batch_kw)
        n_steps = steps_in(plan, per_step)

        def load(i: int, plan=plan, reader=reader):
            """Step i's micro-batches of this worker, uploaded without waiting for the GPU."""
            group = step_micro_batches(plan, i, per_step)
            own = list(group)[rank::world]
            return i, group, own, [reader.batch(b).to(device, non_blocking=True) for b in (own or [group[0]])]

        ahead = None
        while state.step_in_epoch < n_steps and state.step < total_steps:
            _, group, own, mine = ahead if ahead and ahead[0] == state.step_in_epoch else load(state.step_in_epoch)
            weight = 1.0 if own else 0.0  # an epoch's short last step may leave this worker nothing to learn
            _record_examples(train_src, plan, own, state, rank)
            global_targets = int(plan.targets[group.start:group.stop].sum())
            # Dropout depends only on (seed, step, rank): a resumed run draws exactly the same masks.
            torch.manual_seed(cfg.seed * 100_003 + state.step * 97 + rank)
            t_step = time.time()
            out = train_step(ddp, optimizer, scheduler, mine, global_targets, world, cfg.max_grad_norm, weight)
            state.step += 1
            state.step_in_epoch += 1
            # The next step's batches are read and uploaded while the GPU still runs this one; reading this
            # step's loss below waits for it.
            if state.step_in_epoch < n_steps and state.step < total_steps:
                ahead = load(state.step_in_epoch)
            step_tokens = int(plan.tokens[group.start:group.stop].sum())
            tokens_seen += step_tokens
            reduced = torch.cat([out["loss_sum"].reshape(1), out["sums"]])  # one all-reduce for both
            if world > 1:
                torch.distributed.all_reduce(reduced)
            reduced = reduced.cpu()
            loss_sum, stats = reduced[0], reduced[1:]
            step_loss = float(loss_sum) / max(global_targets, 1)
            if state.step - start_step > 2:
                steady_tokens += step_tokens
                steady_seconds += time.time() - t_step
            window_loss += float(loss_sum)
            window_targets += global_targets
            window_tokens += step_tokens
            window_stats += stats
            lr = scheduler.get_last_lr()[0]
            grad_norm = float(out["grad_norm"])
            tracker.log_metrics({"loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm,
                                 **loss_fn.train_metrics(stats, global_targets)}, state.step)
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                dt = time.time() - window_t0
                tps = window_tokens / max(dt, 1e-9)
                eta = (time.time() - t_start) / max(state.step - start_step, 1) * (total_steps - state.step)
                shown = loss_fn.progress(window_stats, window_targets)
                log(f"train  {_bar(state.step / total_steps)} step {state.step}/{total_steps} | "
                    f"loss {window_loss / max(window_targets, 1):.4f}{shown} | lr {lr:.2e} | "
                    f"grad {grad_norm:.2f} | {tps:,.0f} tok/s | eta {_fmt_time(eta)}", flush=True)
                tracker.log_metrics({"tokens_per_second": tps}, state.step)
                window_loss, window_targets, window_tokens, window_t0 = 0.0, 0, 0, time.time()
                window_stats.zero_()
            hook = _test_hooks(state.step, rank)
            if state.step % cfg.eval_steps == 0 or state.step == total_steps or hook == "stop":
                eval_and_checkpoint(final=state.step == total_steps)
            if hook == "stop":
                log(f"stopped after step {state.step} (test hook)")
                tracker.close()
                return {"stopped_at": state.step}
        if state.step_in_epoch >= n_steps:
            note = loss_fn.end_epoch()  # what a loss keeps between epochs (the preference loss: reference log-probs)
            if note:
                log(note)
            state.epoch += 1
            state.step_in_epoch = 0
    wall = time.time() - t_start
    summary = {"best_eval_loss": state.best_eval_loss, "wall_seconds": wall,
               "peak_memory_gib": _peak_memory_gib(device), "tokens_per_second": tokens_seen / max(wall, 1e-9),
               "train_tokens_per_second": steady_tokens / steady_seconds if steady_seconds else None,
               "steps": state.step, "history": state.history}
    if rank == 0:
        tracker.log_table(state.history, "sample_replies.json")
    tracker.close()  # everything written before the driver marks the run finished
    return summary
