"""The adapter pool: LoRA adapters on the device, in a fixed number of slots, chosen per row of a step.

A runner names its LoRA sites (`Site`): the linears of a layer a delta is added to, each with the PEFT modules
whose outputs make up its output (a fused QKV is three: q, k and v side by side). The pool keeps, for every
site, `max_loras` adapters of rank up to `max_lora_rank` (serving/kernels_lora.py has the layout and the op),
allocated once, so the decode steps' CUDA graphs never see a new tensor.

An adapter comes to a slot in two moves. Its files are read on a thread of the pool (safetensors into pinned
host memory: the engine's steps go on meanwhile); then, at the engine's next admission, copied into a slot
(one host-to-device copy per site, queued on the engine's stream behind the step in flight). A slot is
taken by the first free one, else by evicting the least recently used adapter that no running request holds;
when every slot is held, the request waits. A running request holds its adapter's slot until it ends.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.kernels_lora import add_lora, add_lora_gathered, check_gathered, gates_for, triton

log = logging.getLogger("ray.serve")

HOST_CACHE = 8           # adapters kept in host memory after leaving the device (a reload is then one copy)
PEFT_PREFIX = "base_model.model."


class AdapterError(Exception):
    """An adapter that cannot go on this model (its files, its shapes, its rank): the request fails with this."""


@dataclass(frozen=True)
class Adapter:
    """A resolved adapter as the engine gets it: the name requests use and its local folder."""

    name: str
    folder: str


@dataclass(frozen=True)
class Site:
    """Where a layer's LoRA deltas go: a linear of `in_features` inputs whose output is made of `parts`,
    each (PEFT module path, first output column, width)."""

    layer: int
    name: str
    in_features: int
    parts: tuple[tuple[str, int, int], ...]


@dataclass
class HostAdapter:
    """An adapter read and laid out for the pool: per site, A [in, parts * rank] and each part's B [rank, width]
    (None where the adapter does not touch the site), and its scale."""

    name: str
    scale: float
    rank: int
    sites: list[tuple[torch.Tensor, list[torch.Tensor]] | None]
    read_seconds: float


def read_adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json (not a PEFT LoRA adapter folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def lora_scale(cfg: dict) -> float:
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def check_adapter_config(cfg: dict, name: str, max_rank: int) -> None:
    """What the pool can apply: plain LoRA (no DoRA, no per-module ranks, no bias or extra trained modules)
    of rank up to `max_rank`. Raises AdapterError saying what is not."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be served")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise AdapterError(f"adapter {name}: uses {', '.join(unsupported)}, which the adapter pool cannot apply; "
                           "merge it instead (jobs/merge.py)")
    if int(cfg["r"]) > max_rank:
        raise AdapterError(f"adapter {name}: rank {cfg['r']} is above this server's max_lora_rank of {max_rank}; "
                           f"start the server with max_lora_rank={cfg['r']} or more")


def read_host_adapter(adapter: Adapter, sites: list[Site], max_rank: int, dtype: torch.dtype,
                      pin: bool) -> HostAdapter:
    """An adapter's safetensors laid out for the pool's sites (shapes checked against the served model)."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    folder = Path(adapter.folder)
    cfg = read_adapter_config(folder)
    check_adapter_config(cfg, adapter.name, max_rank)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"adapter {adapter.name}: no adapter_model.safetensors in {folder}")
    tensors = load_file(str(weights_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for which in ("lora_A", "lora_B"):
            marker = f".{which}."
            if marker in key:
                module = key.split(marker)[0].removeprefix(PEFT_PREFIX)
                pairs.setdefault(module, {})[which] = value
                break
        else:
            raise AdapterError(f"adapter {adapter.name}: weight {key} is not a LoRA A or B matrix")
    rank = int(cfg["r"])
    where = {module: (i, p) for i, site in enumerate(sites) for p, (module, _, _) in enumerate(site.parts)}
    unknown = sorted(set(pairs) - set(where))
    if unknown:
        raise AdapterError(f"adapter {adapter.name}: trains modules this server does not apply LoRA to "
                           f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); was it trained on "
                           "another model?")
    laid: list[tuple[torch.Tensor, list[torch.Tensor]] | None] = [None] * len(sites)
    for module, ab in pairs.items():
        i, p = where[module]
        site = sites[i]
        _, _, width = site.parts[p]
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.shape != (rank, site.in_features) or b.shape != (width, rank):
            got = f"A {tuple(a.shape) if a is not None else None}, B {tuple(b.shape) if b is not None else None}"
            raise AdapterError(f"adapter {adapter.name}: {module} has LoRA shapes {got}; the served model needs A "
                               f"({rank}, {site.in_features}) and B ({width}, {rank}): it was trained on another base")
        if laid[i] is None:
            laid[i] = (torch.zeros(site.in_features, len(site.parts) * max_rank, dtype=dtype, pin_memory=pin),
                       [torch.zeros(max_rank, w, dtype=dtype, pin_memory=pin) for _, _, w in site.parts])
        host_a, host_bs = laid[i]
        host_a[:, p * max_rank:p * max_rank + rank] = a.t()
        host_bs[p][:rank] = b.t()
    return HostAdapter(adapter.name, lora_scale(cfg), rank, laid, time.perf_counter() - t0)


class LoraStep:
    """One step's adapters: `step(layer, site, h, y)` adds each token's delta to a linear's output `y`."""

    def __init__(self, pool: AdapterPool | None = None, gates: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None):
        """`gates` for the dense pass, or `slots` (each token's slot) for the gathered kernels."""
        self.pool, self.gates, self.slots = pool, gates, slots

    def __call__(self, layer: int, name: str, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.gates is None and self.slots is None:
            return y
        pool = self.pool
        i = pool.index.get((layer, name))
        if i is None:
            return y
        if self.slots is not None:
            return add_lora_gathered(y, h, self.slots, pool.scales, pool.a[i], pool.b[i], pool.offsets[i])
        return add_lora(y, h, self.gates, pool.a[i], pool.b[i], pool.offsets[i])


NO_LORA = LoraStep()


class AdapterPool:
    def __init__(self, sites: list[Site], max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 metrics=None, gather_max: int = 16):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, not {max_loras} and {max_rank}")
        self.sites, self.max_loras, self.max_rank = sites, max_loras, max_rank
        self.dtype, self.device, self.metrics = dtype, torch.device(device), metrics
        s, r = max_loras, max_rank
        self.a = [torch.zeros(site.in_features, s * len(site.parts) * r, dtype=dtype, device=device) for site in sites]
        self.b = [[torch.zeros(s * r, w, dtype=dtype, device=device) for _, _, w in site.parts] for site in sites]
        self.offsets = [[start for _, start, _ in site.parts] for site in sites]
        self.index = {(site.layer, site.name): i for i, site in enumerate(sites)}
        self.scales = torch.zeros(s, dtype=torch.float32, device=device)
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recently used first
        self.name_of: dict[int, str] = {}
        self.refs = [0] * s
        self.free = list(range(s - 1, -1, -1))
        self.host: collections.OrderedDict[str, HostAdapter] = collections.OrderedDict()
        self.reading: dict[str, Future] = {}
        self.failed: dict[str, str] = {}
        self.on_read = None  # called (from the reading thread) when a read ends: the engine wakes up
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmops-adapter-read")
        self.gather_max = gather_max
        self.gathered, self.kernels = self._pick_kernels()

    def _pick_kernels(self) -> tuple[bool, str]:
        """With `gather_max`, the gathered kernels on a GPU where they run and agree with the dense pass (checked
        now), else dense. On the H200 (bench/results/serve_lora.json) they took one stream over an adapter from 65 %
        to 72 % of the base's tokens/s and 8 streams from 67 % to 71 %; above 16 tokens the dense pass is used."""
        if self.device.type != "cuda" or not self.gather_max:
            return False, "dense"
        if triton is None:
            return False, "dense (Triton is not installed)"
        try:
            problem = check_gathered(self.device, self.dtype)
        except Exception as err:  # noqa: BLE001 - any failure means: the dense pass
            problem = f"{type(err).__name__}: {err}"
        if problem:
            log.warning("adapter kernels: the gathered kernels disagree with the dense pass (%s); dense only", problem)
            return False, "dense (gathered kernels failed their check)"
        return True, f"gathered up to {self.gather_max} tokens, dense above"

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.a) + sum(
            t.numel() * t.element_size() for bs in self.b for t in bs)

    def step(self, loras: torch.Tensor | None) -> LoraStep:
        """The step whose tokens use adapter slots `loras` [tokens] (-1: the base); None: no adapter at all."""
        if loras is None:
            return NO_LORA
        if self.gathered and loras.shape[0] <= self.gather_max:
            return LoraStep(self, slots=loras)
        return LoraStep(self, gates_for(loras, self.scales, self.dtype))

    def acquire(self, adapter: Adapter) -> int | None:
        """The slot holding `adapter`, now held by one more request; None while it is read or while every slot
        is held by running requests (ask again at the next step). Raises AdapterError if it cannot be loaded."""
        key = adapter.folder
        slot = self.slot_of.get(key)
        if slot is not None:
            self.slot_of.move_to_end(key)
            self.refs[slot] += 1
            self._count("hits")
            return slot
        if key in self.failed:
            raise AdapterError(self.failed[key])
        host = self.host.get(key)
        if host is None:
            future = self.reading.get(key)
            if future is None:
                self.reading[key] = self._reader.submit(self._read, adapter)
                return None
            if not future.done():
                return None
            del self.reading[key]
            try:
                host = future.result()
            except AdapterError as err:
                self.failed[key] = str(err)
                raise
            except Exception as err:  # noqa: BLE001 - unreadable files: this adapter fails, the engine goes on
                self.failed[key] = f"adapter {adapter.name}: cannot be read ({type(err).__name__}: {err})"
                raise AdapterError(self.failed[key]) from err
            self.host[key] = host
            while len(self.host) > HOST_CACHE:
                self.host.popitem(last=False)
        slot = self._take_slot()
        if slot is None:
            return None
        t0 = time.perf_counter()
        self._write(slot, host)
        self.slot_of[key], self.name_of[slot], self.refs[slot] = slot, adapter.name, 1
        self._count("loads", host.read_seconds + time.perf_counter() - t0)
        host.read_seconds = 0.0  # a reload from host memory costs only the copy
        log.info("adapter %s loaded into slot %d (rank %d)", adapter.name, slot, host.rank)
        return slot

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.refs[slot] -= 1

    def loaded(self) -> list[str]:
        """The folders of the adapters in slots (several names may reach one folder)."""
        return list(self.slot_of)

    def _read(self, adapter: Adapter) -> HostAdapter:
        try:
            return read_host_adapter(adapter, self.sites, self.max_rank, self.dtype, pin=self.device.type == "cuda")
        finally:
            if self.on_read is not None:
                self.on_read()

    def _take_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        for key, slot in self.slot_of.items():  # least recently used first
            if self.refs[slot] == 0:
                del self.slot_of[key]
                self._count("evictions")
                log.info("adapter %s evicted from slot %d", self.name_of.pop(slot), slot)
                return slot
        return None

    def _write(self, slot: int, host: HostAdapter) -> None:
        """Copy an adapter into `slot` (queued behind the step in flight on the same stream: it never sees a
        half-written slot). Sites the adapter leaves alone are zeroed."""
        r = self.max_rank
        for i, site in enumerate(self.sites):
            parts = len(site.parts)
            a_cols = self.a[i][:, slot * parts * r:(slot + 1) * parts * r]
            b_rows = [b[slot * r:(slot + 1) * r] for b in self.b[i]]
            laid = host.sites[i]
            if laid is None:
                a_cols.zero_()
                for b in b_rows:
                    b.zero_()
                continue
            a_cols.copy_(laid[0], non_blocking=True)
            for b, hb in zip(b_rows, laid[1]):
                b.copy_(hb, non_blocking=True)
        self.scales[slot] = host.scale

    def _count(self, what: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.adapter(what, seconds)
