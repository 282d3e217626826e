"""The projections of a decode step of few rows (at most GEMV_MAX_ROWS) as one Triton kernel each.

At one to four rows a projection is a matrix-vector product: it reads its weight once and does almost no
arithmetic, so all that counts is how close it gets to the memory's bandwidth. The weights of ChatGLM2-6B's
layer (q/k/v 4,608 x 4,096, o 4,096 x 4,096, gate/up 27,392 x 4,096, down 4,096 x 13,696) and its head
(65,024 x 4,096) take ~2.9 ms per step to read on an H200 where the step takes ~4.1 ms (bench/NOTES.md).

`gemv` computes y = x W^T (+ b) for x of at most 16 rows: each program owns BLOCK_N output columns over the
whole of K, loading W in [BLOCK_N, BLOCK_K] tiles (rows of W are contiguous in K, so each tile is BLOCK_N
contiguous runs) and the few rows of x padded to 16 for `tl.dot`; Triton pipelines the tile loads. The
block sizes are autotuned per weight shape on first use (with the L2 cache flushed between timings, so a
weight that would fit in it is timed as the decode step meets it: cold). With `swiglu`, x is SwiGLU's input
(gate and up side by side, 2K wide) and the kernel applies SiLU(gate) * up as it loads it: the down projection
and the activation in one kernel, and no activation written to memory.

Whether a projection runs here or through cuBLAS is measured, not assumed (`pick_gemv`): at start-up each
projection of the model is timed both ways at one row over all layers' weights, replayed from a CUDA graph as
the decode step runs, and only those where the kernel is faster use it. The reference for correctness is
`F.linear` (and `TorchOps.silu_mul` before it).
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

if triton is not None:

    def _configs():
        # Few enough to tune in a few seconds per shape at start-up. Small BLOCK_N keeps every SM busy at
        # N = 4,096 (256 programs at 16); wide BLOCK_K keeps enough loads in flight per program.
        shapes = ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 128, 4, 4),
                  (64, 256, 8, 3))
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, y_stride, HAS_BIAS: tl.constexpr,
                     SWIGLU: tl.constexpr, IEEE: tl.constexpr, ITERS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        m = tl.arange(0, 16)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, nm = m < M, n < N
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        # ITERS: 0 on a GPU; Triton's interpreter (the CPU check) needs a loop bound that is a number
        for it in range(0, tl.cdiv(K, BLOCK_K) if ITERS == 0 else ITERS):
            k = it * BLOCK_K + tl.arange(0, BLOCK_K)
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
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * y_stride + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mm[:, None] & nm[None, :])

    _gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "SWIGLU"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (with `swiglu`: [M, 2K], gate then up) times weight [N, K]^T, plus bias [N]; M <= 16."""
    m = x.shape[0]
    n, k = weight.shape
    assert m <= PAD_ROWS and x.shape[1] == (2 * k if swiglu else k) and weight.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None, SWIGLU=swiglu, IEEE=x.dtype == torch.float32)
    if INTERPRETED:  # Triton's interpreter (the CPU check) has no autotuner: small blocks, wider for a big head
        block_n = 16 if n <= 1024 else 512  # (the interpreter's cost is per program)
        _gemv_kernel[(triton.cdiv(n, block_n),)](*args, **flags, ITERS=triton.cdiv(k, 32), BLOCK_N=block_n,
                                                 BLOCK_K=32)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags, ITERS=0)
    return y


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              swiglu: bool = False, silu_mul=TorchOps.silu_mul) -> torch.Tensor:
    """What `gemv` computes, the other way: `silu_mul` (PyTorch's by default), then cuBLAS."""
    return F.linear(silu_mul(x) if swiglu else x, weight, bias)


def check_gemv(device, dtype: torch.dtype, shapes: dict[str, tuple[int, int, bool, bool]]) -> str | None:
    """`gemv` against `reference` at 1 to GEMV_MAX_ROWS rows for each {name: (N, K, bias, swiglu)}; None if
    they agree, else what differs."""
    check = Agreement(dtype, device)
    for name, (n, k, has_bias, swiglu) in shapes.items():
        w = check.rand(n, k) / k ** 0.5
        b = check.rand(n) if has_bias else None
        for m in range(1, GEMV_MAX_ROWS + 1):
            x = check.rand(m, 2 * k if swiglu else k)
            check.close(f"gemv {name} ({m} rows)", gemv(x, w, b, swiglu=swiglu), reference(x, w, b, swiglu=swiglu))
    return check.verdict()


class Projections:
    """A model's decode-step projections by name (GLM: "qkv", "o", "gate_up", "down", "head"), each a list of
    (weight, bias) per layer, and the names whose few-row steps run through `gemv` (`fast`). `swiglu` names the
    projection whose input is SwiGLU's (GLM's "down"; None for a GELU MLP): in `fast`, the activation is
    fused into it as well (`down_swiglu`)."""

    def __init__(self, weights: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], swiglu: str | None = None):
        self.weights, self.swiglu = weights, swiglu
        self.fast: set[str] = set()
        self.note = ""

    def __call__(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights[name][i]
        if name in self.fast and x.shape[0] <= GEMV_MAX_ROWS and x.stride(-1) == 1:
            return gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def fuses_swiglu(self, rows: int) -> bool:
        return self.swiglu in self.fast and rows <= GEMV_MAX_ROWS

    def down_swiglu(self, i: int, gate_up: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights[self.swiglu][i]
        return gemv(gate_up, weight, bias, swiglu=True)


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
    layers at one row (each name timed as its whole stack, weight after weight, as a decode step meets them;
    the SwiGLU projection against the step's own `silu_mul` kernel, then cuBLAS). Sets `projections.fast` and a
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
                        f"Triton vs cuBLAS: {'; '.join(timings)}")
    return projections


def _measure(projections: Projections, device: torch.device, silu_mul) -> tuple[str | None, list[str]]:
    """Check `gemv` at the model's shapes, then time each projection's stack both ways and add the faster-with-
    Triton names to `projections.fast`: (what disagreed or None, one timing line per name)."""
    first = {name: layers[0] for name, layers in projections.weights.items()}
    dtype = next(iter(first.values()))[0].dtype
    shapes = {name: (w.shape[0], w.shape[1], b is not None, name == projections.swiglu)
              for name, (w, b) in first.items()}
    problem = check_gemv(device, dtype, shapes)
    if problem:
        return problem, []
    timings = []
    theirs = functools.partial(reference, silu_mul=silu_mul)
    for name, layers in projections.weights.items():
        swiglu = name == projections.swiglu
        k = layers[0][0].shape[1]
        x = torch.randn(1, 2 * k if swiglu else k, dtype=dtype, device=device)

        def stack(fn, layers=layers, x=x, swiglu=swiglu):
            return lambda: [fn(x, w, b, swiglu=swiglu) for w, b in layers]

        ms_ours, ms_theirs = _time_ms(stack(gemv)), _time_ms(stack(theirs))
        if ms_ours < ms_theirs:
            projections.fast.add(name)
        timings.append(f"{name} {ms_ours:.3f} vs {ms_theirs:.3f}")
    return None, timings

