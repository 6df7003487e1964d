"""Which backward the Triton sim_lse and SigLIP launchers take under ``BACKWARD = "auto"`` (the
default): a cost model fed with kernel times measured on an H200.

The fused backward kernels (sim_lse's dq/dk and Gram kernels, SigLIP's dx/dy) recompute S in the
same tile loop as the forward, but on the H200 they ran at half the forward's rate or less: at
B = 16384, D = 512, bf16, the forward tile loop did 2·B·M·D FLOPs at 237 TFLOP/s while dq + dk did
their 8 units at 138 (98 at D = 1024, the Gram backward 126, SigLIP's 153).  The GEMM backward
keeps the part that runs well — a forward-shaped kernel recomputes S once and writes dS (or
SigLIP's G) — and hands the two products to cuBLAS (760 TFLOP/s on the same machine).  Its time
is predicted from those same measurements:

    t_gemm = 2·B·M·D / r_fwd(D)                 the dS kernel, at the forward tile loop's rate
           + B·M·e / HBM                        writing dS (e bytes an entry)
           + max(4·B·M·D / r_cublas, 2·B·M·e / HBM)   dQ = dS·K and dK = dSᵀ·Q, reading dS twice
    t_fused = units(D)·B·M·D / r_bwd(D)          the kernels' own work at their measured rate

(for SigLIP, whose gradient needs no statistic of the forward, a differentiated step runs only the
GEMM backward's pass, which also sums the loss; for a Gram loss the forward stays the Gram kernel, and the GEMM backward's tile kernel, with the
Gram forward's tiles and its measured rate as r_fwd, stores G = dS + dSᵀ, so there is one product:
4·B·M·D becomes 2·B·M·D and 2·B·M·e becomes B·M·e).  The rates ``r`` come from ``MEASURED`` at the
nearest measured D: D = 512 and 1024 are measured, D below 512 takes the rates of 512 (an
extrapolation; ``benchmarks/gpu_quick.py`` times ``triton`` against ``triton:deterministic``,
which checks the choice).  The GEMM path is taken when it is predicted ``MARGIN`` times faster,
and for at least ``MIN_PAIRS`` (i, j) pairs (below that both paths take microseconds and the fused
one launches fewer kernels and allocates no dS buffer).  It needs no index lists and no column
ranges; the launchers check that and keep the fused kernels otherwise.

fp32 inputs are not measured on either path; the model takes the bf16 rates times
``FP32_TILE_FACTOR`` for every Triton tile loop (tf32x3: three products at the dense tf32 rate,
half of bf16's) and ``CUBLAS_FP32_FLOPS`` for cuBLAS's products (six bf16 products of three-term
splits, ``products.mm_f32``, unless TF32 matmuls are enabled globally).  The GEMM path wins there
by its work: the fused fp32 kernels split D into 128-wide output chunks and recompute S for each
(20 units at D = 512, 36 at 1024, against 2 of recompute and 4 of products).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# Kernel times on an NVIDIA H200 (2026-12-04, Triton 3.6, bf16, default configs), from
# benchmarks/results/nvidia-h200-2026-12-04-diag/profile.log: path -> {D: (rows, cols, ms)}.
# The Gram rows are NT-Xent at B = 16384 (2B = 32768 rows).
MEASURED: Dict[str, Dict[int, Tuple[int, int, float]]] = {
    "general_fwd": {512: (16384, 16384, 1.162), 1024: (16384, 16384, 1.684)},
    "general_bwd": {512: (16384, 16384, 4.242 + 3.724), 1024: (16384, 16384, 14.593 + 13.573)},
    "gram_fwd": {512: (32768, 32768, 3.389)},
    "gram_bwd": {512: (32768, 32768, 26.147)},
    "siglip_fwd": {512: (16384, 16384, 1.332)},
    "siglip_bwd": {512: (16384, 16384, 3.804 + 3.362)},
}
CUBLAS_FLOPS = 760e12   # torch.matmul, bf16, 8192³, the same machine (nvidia-h200-2026-12-04/summary.txt)
CUBLAS_FP32_FLOPS = CUBLAS_FLOPS / 6  # fp32 products as six bf16 ones (products.mm_bf16x6), split passes aside
FP32_TILE_FACTOR = 1 / 6   # a tf32x3 tile loop against the measured bf16 one (not measured)
HBM_BYTES_PER_S = 4.3e12
MARGIN = 1.25
MIN_PAIRS = 1 << 22     # B·M below this keeps the fused kernels


# Work per path in units of B·M·D FLOPs: the kernel modules' own ``WORK_UNITS`` (sim_lse's and
# siglip's), which each registers here when it is imported (``declare_work``).
WORK: Dict[str, object] = {}


def declare_work(table: Dict[str, object]) -> None:
    WORK.update(table)


def _units(path: str, D: int, dtype: str = "bf16") -> float:
    """Work of ``path`` in units of B·M·D FLOPs, from the kernel modules' ``WORK_UNITS``."""
    u = WORK[path]
    return float(u(D, dtype) if callable(u) else u)


def rate(path: str, D: int, dtype: str = "bf16") -> float:
    """FLOP/s of ``path`` at the nearest measured D (its own units of work): measured in bf16
    (fp16 runs the same instructions), times ``FP32_TILE_FACTOR`` for fp32."""
    points = MEASURED[path]
    d = min(points, key=lambda m: (abs(m - D), m))
    rows, cols, ms = points[d]
    r = _units(path, d) * rows * cols * d / (ms * 1e-3)
    return r * FP32_TILE_FACTOR if dtype == "fp32" else r


def _fwd_path(kind: str) -> str:
    """The measured kernel whose tile loop the GEMM backward's tile kernel repeats: the general
    forward's (64 × 128 tiles) for dS, the Gram forward's (64 × 64, both views) for G, SigLIP's."""
    return {"general": "general_fwd", "gram": "gram_fwd", "siglip": "siglip_fwd"}[kind]


def tile_rate(kind: str, D: int, dtype: str = "bf16") -> float:
    """FLOP/s of the GEMM backward's tile kernel: its forward's tile loop (the Gram forward evaluates
    each S tile once for half the pairs, 1 unit, so its FLOP rate of S is that of its unit)."""
    return rate(_fwd_path(kind), D, dtype)


def _dtype_name(elem: int) -> str:
    return "fp32" if elem == 4 else "bf16"


def gemm_backward_seconds(B: int, M: int, D: int, elem: int, kind: str = "general") -> float:
    """Predicted time of the GEMM backward (dS kernel + two cuBLAS products; one for a Gram matrix)."""
    pairs = float(B) * M
    products = 1 if kind == "gram" else 2
    ds = 2 * pairs * D / tile_rate(kind, D, _dtype_name(elem)) + pairs * elem / HBM_BYTES_PER_S
    flops = CUBLAS_FP32_FLOPS if elem == 4 else CUBLAS_FLOPS
    return ds + max(2 * products * pairs * D / flops, products * pairs * elem / HBM_BYTES_PER_S)


def fused_backward_seconds(B: int, M: int, D: int, kind: str = "general", elem: int = 2) -> float:
    """Predicted time of the fused backward kernels at their measured rate."""
    path = {"general": "general_bwd", "gram": "gram_bwd", "siglip": "siglip_bwd"}[kind]
    dt = _dtype_name(elem)
    return _units(path, D, dt) * float(B) * M * D / rate(path, D, dt)


def step_seconds(path: str, B: int, M: int, D: int, elem: int = 2, kind: str = "general") -> float:
    """Predicted forward + backward time of a step with backward ``path`` ("gemm" or
    "deterministic") for inputs of ``elem`` bytes (4: fp32); ``kind="gram"`` runs the Gram forward
    either way."""
    pairs = float(B) * M
    fwd, dt = _fwd_path(kind), _dtype_name(elem)
    if path == "gemm" and kind == "siglip":  # one pass gives the loss and its gradient (``siglip_fwd_grads``)
        return gemm_backward_seconds(B, M, D, elem, kind)
    bwd = (gemm_backward_seconds(B, M, D, elem, kind) if path == "gemm"
           else fused_backward_seconds(B, M, D, kind, elem))
    return _units(fwd, D, dt) * pairs * D / rate(fwd, D, dt) + bwd


def gemm_pays(B: int, M: int, D: int, dtype: torch.dtype, kind: str = "general") -> bool:
    """Whether ``"auto"`` takes the GEMM backward for this shape (module docstring)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or B * M < MIN_PAIRS or D <= 0:
        return False
    elem = dtype.itemsize
    return MARGIN * step_seconds("gemm", B, M, D, elem, kind) < step_seconds("deterministic", B, M, D, elem, kind)
