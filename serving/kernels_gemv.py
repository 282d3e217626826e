"""The projections of a decode step of few rows (at most GEMV_MAX_ROWS) as one Triton kernel each.

At one to four rows a projection is a matrix-vector product: it reads its weight once and does almost no
arithmetic, so all that counts is how close it gets to the memory's bandwidth. The weights of ChatGLM2-6B's
layer (q/k/v 4,608 x 4,096, o 4,096 x 4,096, gate/up 27,392 x 4,096, down 4,096 x 13,696) and its head
(65,024 x 4,096) take ~2.9 ms per step to read on an H200 where the step takes ~4.1 ms (bench/NOTES.md).

`gemv` computes y = x W^T (+ b) for x of at most 16 rows: each program owns BLOCK_N output columns over one
of `split` equal parts of K, loading W in [BLOCK_N, BLOCK_K] tiles (rows of W are contiguous in K, so each
tile is BLOCK_N contiguous runs) and the few rows of x padded to 16 for `tl.dot`; Triton pipelines the tile
loads. With split 1 a program covers all of K and writes y; a narrow, deep weight (ChatGLM2's down projection:
N 4,096, K 13,696) then has too few programs, each with a long serial loop, to keep every SM's loads in
flight, so K is split and the parts' float32 sums are added by a second, tiny kernel in a fixed order (the
same result every run, unlike atomic adds). The block sizes are autotuned per weight shape and split on first
use. With `swiglu`, x is SwiGLU's input (gate and up side by side, 2K wide) and the kernel applies
SiLU(gate) * up as it loads it: the down projection and the activation in one kernel, and no activation
written to memory; but every program computes the activation of all its K for 16 padded rows, so whether the
fusion pays is measured too. (On an H100, ChatGLM2-6B's 28 down projections at one row: fused and whole
4.94 ms, K in 4 parts with the activation before it 1.25 ms, cuBLAS 1.28; bench/NOTES.md.)

Whether a projection runs here or through cuBLAS, with which split, and whether SwiGLU is fused, is measured,
not assumed (`pick_gemv`): at start-up each projection of the model is timed every way at one row over all
layers' weights, replayed from a CUDA graph as the decode step runs, and only those where the kernel is faster
use it. The reference for correctness is `F.linear` (and `TorchOps.silu_mul` before it).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from serving.kernels import INTERPRETED, Agreement, TorchOps

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: cuBLAS / PyTorch only
    triton = None

log = logging.getLogger("ray.serve")

GEMV_MAX_ROWS = 4  # decode steps of at most this many rows use the kernel (CUDA graph sizes 1, 2, 4)
PAD_ROWS = 16  # the smallest M of tl.dot: x's rows are padded to it (masked loads, nothing read)
SPLITS = (1, 4)  # the parts of K timed at start-up for a weight of fewer than WIDE output columns
WIDE = 16384  # gate_up (27,392) and the head (65,024) have programs enough across N: split 1 only

if triton is not None:

    def _configs():
        # Few enough to tune in a few seconds per shape at start-up. Small BLOCK_N keeps every SM busy at
        # N = 4,096 (256 programs at 16); wide BLOCK_K keeps enough loads in flight per program.
        shapes = ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 128, 4, 4),
                  (64, 256, 8, 3))
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, N, K, x_stride, w_stride, y_stride,
                     HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                     ITERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.arange(0, 16)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, nm = m < M, n < N
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        # this program's part of K: `per` tiles from tile `first` (the last part may run past K: masked)
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT)
        first = tl.program_id(1) * per
        # ITERS: 0 on a GPU; Triton's interpreter (the CPU check) needs a loop bound that is a number
        for it in range(0, per if ITERS == 0 else ITERS):
            k = (first + it) * BLOCK_K + tl.arange(0, BLOCK_K)
            km = k < K
            xmask = mm[:, None] & km[None, :]
            if SWIGLU:  # x holds [gate | up], each K wide; SiLU(gate) * up, rounded as the silu_mul kernel rounds
                gate = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=xmask, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + m[:, None] * x_stride + K + k[None, :], mask=xmask, other=0.0).to(tl.float32)
                x = (up * gate / (1.0 + tl.exp(-gate))).to(w_ptr.dtype.element_ty)
            else:
                x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=xmask, other=0.0)
            w = tl.load(w_ptr + n[:, None] * w_stride + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + m[:, None] * y_stride + n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mm[:, None] & nm[None, :])
        else:  # this part's float32 sum; _sum_parts_kernel adds the parts
            tl.store(part_ptr + (tl.program_id(1) * M + m[:, None]) * N + n[None, :], acc,
                     mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _sum_parts_kernel(part_ptr, b_ptr, y_ptr, M, N, y_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK: tl.constexpr):
        """y[m] = the SPLIT parts of row m added in order (+ bias), in y's dtype."""
        row = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        nm = n < N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(part_ptr + (s * M + row) * N + n, mask=nm, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + n, acc.to(y_ptr.dtype.element_ty), mask=nm)

    _gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "SWIGLU", "SPLIT"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         swiglu: bool = False, split: int = 1) -> torch.Tensor:
    """x [M, K] (with `swiglu`: [M, 2K], gate then up) times weight [N, K]^T, plus bias [N]; M <= 16. `split`:
    the parts of K run by separate programs (their sums added in a fixed order)."""
    m = x.shape[0]
    n, k = weight.shape
    assert m <= PAD_ROWS and x.shape[1] == (2 * k if swiglu else k) and weight.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    bias_or_any = bias if bias is not None else weight
    args = (x, weight, bias_or_any, y, part, m, n, k, x.stride(0), weight.stride(0), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None, SWIGLU=swiglu, IEEE=x.dtype == torch.float32, SPLIT=split)
    if INTERPRETED:  # Triton's interpreter (the CPU check) has no autotuner: small blocks, wider for a big head
        block_n = 16 if n <= 1024 else 512  # (the interpreter's cost is per program)
        _gemv_kernel[(triton.cdiv(n, block_n), split)](*args, **flags, ITERS=triton.cdiv(triton.cdiv(k, 32), split),
                                                       BLOCK_N=block_n, BLOCK_K=32)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](*args, **flags, ITERS=0)
    if split > 1:
        block = 256
        _sum_parts_kernel[(m, triton.cdiv(n, block))](part, bias_or_any, y, m, n, y.stride(0),
                                                      HAS_BIAS=bias is not None, SPLIT=split, BLOCK=block)
    return y


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              swiglu: bool = False, silu_mul=TorchOps.silu_mul) -> torch.Tensor:
    """What `gemv` computes, the other way: `silu_mul` (PyTorch's by default), then cuBLAS."""
    return F.linear(silu_mul(x) if swiglu else x, weight, bias)


def check_gemv(device, dtype: torch.dtype, shapes: dict[str, tuple[int, int, bool, bool]],
               splits: tuple[int, ...] = SPLITS) -> str | None:
    """`gemv` against `reference` at 1 to GEMV_MAX_ROWS rows and each of `splits` for each
    {name: (N, K, bias, swiglu)}; None if they agree, else what differs."""
    check = Agreement(dtype, device)
    for name, (n, k, has_bias, swiglu) in shapes.items():
        w = check.rand(n, k) / k ** 0.5
        b = check.rand(n) if has_bias else None
        for m in range(1, GEMV_MAX_ROWS + 1):
            x = check.rand(m, 2 * k if swiglu else k)
            want = reference(x, w, b, swiglu=swiglu)
            for split in splits_for(n, splits):
                check.close(f"gemv {name} ({m} rows, split {split})", gemv(x, w, b, swiglu=swiglu, split=split), want)
    return check.verdict()


def splits_for(n: int, splits: tuple[int, ...] = SPLITS) -> tuple[int, ...]:
    """The parts of K worth trying for a weight of n output columns: a wide one has programs enough already."""
    return splits if n < WIDE else (1,)


class Projections:
    """A model's decode-step projections by name (GLM: "qkv", "o", "gate_up", "down", "head"), each a list of
    (weight, bias) per layer, the names whose few-row steps run through `gemv` (`fast`) and in how many parts
    of K (`split`, 1 where absent). `swiglu` names the projection whose input is SwiGLU's (GLM's "down"; None
    for a GELU MLP): in `fast` and with `fuse` on, the activation is computed inside it (`down_swiglu`)."""

    def __init__(self, weights: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], swiglu: str | None = None):
        self.weights, self.swiglu = weights, swiglu
        self.fast: set[str] = set()
        self.split: dict[str, int] = {}
        self.fuse = True
        self.note = ""

    def __call__(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights[name][i]
        if name in self.fast and x.shape[0] <= GEMV_MAX_ROWS and x.stride(-1) == 1:
            return gemv(x, weight, bias, split=self.split.get(name, 1))
        return F.linear(x, weight, bias)

    def fuses_swiglu(self, rows: int) -> bool:
        return self.fuse and self.swiglu in self.fast and rows <= GEMV_MAX_ROWS

    def down_swiglu(self, i: int, gate_up: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights[self.swiglu][i]
        return gemv(gate_up, weight, bias, swiglu=True, split=self.split.get(self.swiglu, 1))


def _time_ms(fn, reps: int = 20) -> float:
    """Median time of `fn` in ms, replayed from a CUDA graph as the decode step runs (triton.testing's
    do_bench_cudagraph). Launched from Python, a stack of 28 small kernels would time the launches (a Triton
    launch costs several times cuBLAS's on the host) rather than the GPU's work, and bias the choice against
    the kernel. No L2 flush is needed: every stack timed reads far more weight than the L2 holds."""
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


def pick_gemv(projections: Projections, device: torch.device, mode: str = "auto",
              silu_mul=TorchOps.silu_mul) -> Projections:
    """Decide which projections use `gemv` at few rows: none when `mode` is "off", not on a GPU or without
    Triton; else each name whose kernel agrees with the reference and is faster than cuBLAS over all its
    layers at one row, with the fastest split of K (each name timed as its whole stack, weight after weight,
    as a decode step meets them; the SwiGLU projection against the step's own `silu_mul` kernel, then cuBLAS,
    and with the activation inside the GEMV or before it). Sets `projections.fast`, `split`, `fuse` and a
    one-line `note` of what was measured; returns `projections`."""
    if device.type != "cuda":
        return projections
    if mode == "off" or triton is None:
        projections.note = f"decode GEMV: cuBLAS ({'decode_gemv=off' if mode == 'off' else 'no Triton'})"
        return projections
    try:  # never let the choice stop the server: any failure means cuBLAS, said in the note
        problem, timings = _measure(projections, device, silu_mul)
    except Exception as err:  # noqa: BLE001
        problem, timings = f"{type(err).__name__}: {err}", []
    if problem:
        projections.fast.clear()
        projections.note = f"decode GEMV: cuBLAS (the Triton kernel failed its check: {problem})"
        log.warning(projections.note)
        return projections
    chosen = ", ".join(sorted(projections.fast)) or "none"
    projections.note = (f"decode GEMV (<= {GEMV_MAX_ROWS} rows): Triton for {chosen}; ms per step at 1 row, "
                        f"fastest vs cuBLAS: {'; '.join(timings)}")
    return projections


def _measure(projections: Projections, device: torch.device, silu_mul) -> tuple[str | None, list[str]]:
    """Check `gemv` at the model's shapes, then time each projection's stack every way and add the faster-with-
    Triton names to `projections.fast` (with their split, and whether SwiGLU is fused): (what disagreed or None,
    one timing line per name)."""
    first = {name: layers[0] for name, layers in projections.weights.items()}
    dtype = next(iter(first.values()))[0].dtype
    shapes = {name: (w.shape[0], w.shape[1], b is not None, name == projections.swiglu)
              for name, (w, b) in first.items()}
    problem = check_gemv(device, dtype, shapes)
    if problem:
        return problem, []
    timings = []
    for name, layers in projections.weights.items():
        swiglu = name == projections.swiglu
        n, k = layers[0][0].shape
        x = torch.randn(1, 2 * k if swiglu else k, dtype=dtype, device=device)

        def stack(step, layers=layers, x=x):
            return lambda: [step(x, w, b) for w, b in layers]

        # every way to run this projection at one row: (Triton?, split, SwiGLU fused?) -> its layers' step
        ways = {(False, 1, False): functools.partial(reference, swiglu=swiglu, silu_mul=silu_mul)}
        for split in splits_for(n):
            ways[(True, split, swiglu)] = functools.partial(_gemv_way, swiglu=swiglu, split=split)
            if swiglu:  # the step's SwiGLU kernel, then the GEMV of its output
                ways[(True, split, False)] = functools.partial(_gemv_way, silu_mul=silu_mul, split=split)
        ms = {way: _time_ms(stack(step)) for way, step in ways.items()}
        triton_way, split, fused = best = min(ms, key=ms.get)
        if triton_way:
            projections.fast.add(name)
            projections.split[name] = split
            if swiglu:
                projections.fuse = fused
        timings.append(f"{name} {ms[best]:.3f}" + (f" ({_way_name(best, swiglu)})" if triton_way else "")
                       + f" vs {ms[(False, 1, False)]:.3f}")
    return None, timings


def _gemv_way(x, w, b, *, split: int, swiglu: bool = False, silu_mul=None):
    return gemv(silu_mul(x) if silu_mul else x, w, b, swiglu=swiglu, split=split)


def _way_name(way: tuple[bool, int, bool], swiglu: bool) -> str:
    _, split, fused = way
    return ", ".join([f"split {split}"] + ([f"SwiGLU {'fused' if fused else 'before it'}"] if swiglu else []))
