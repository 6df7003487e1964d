r"""Triton kernels of the similarity-LSE core (primitive ``"sim_lse"``).

The maths is the contract of :mod:`contrastive_ops.primitives.sim_lse`::

    Q = q[row_index] (B, D)     K = k[col_index] (M, D)     S = scale · Q Kᵀ  (B, M)
    row_lse[i] = LSE_{j allowed for i} S[i, j]      col_lse[j] = LSE_{i : j allowed for i} S[i, j]

with *allowed* = ``col_start[i] <= j < col_end[i]`` minus the ``exclude[i, :]``
entries.  No kernel stores B×M: S is rebuilt tile by tile from Q and K with
:func:`.tiles.s_tile` (``tl.dot`` over D in the ``chunk_d`` chunks, fp32
accumulation; 16-bit inputs on tensor cores; fp32 inputs on tensor cores as
``tf32x3``, plain ``tf32`` only when ``torch.backends.cuda.matmul.allow_tf32``
is on, exact ``ieee`` under the interpreter).

Paths and their cost
--------------------
Costs in units of B·M·D (one product of a (B, D) by a (D, M) operand is 2
units).  "CLIP" is the symmetric InfoNCE (row and column LSE, q ≠ k); "Gram"
is q *is* k (no index lists, no ranges, no column LSE: NT-Xent, MV-InfoNCE,
SupCon "all", DCL), where M = B.  n_d = cdiv(D, max width) output chunks of
the backward accumulators (``tiles.block_do``: all of D up to 512 in 16-bit
and 128 in fp32 for dq/dk, up to 256 for the Gram backward, whose three
accumulating loops spill beyond 64 × 256 on sm_90a).

==================================  ==================  =============================  =============
path                                units               extra memory                   deterministic
==================================  ==================  =============================  =============
forward, general (split-M)          2                   n_split·B + T_B·M fp32         yes
forward, Gram (rows J ≥ I)          1                   T·B fp32                       yes
backward, general, dq + dk kernels  2·(2n_d + 2)        T_B fp32 (dscale parts)        yes  ← auto, small
                                    = 8 for D ≤ 512 (16-bit); for D = 768, 1024 (16-bit)
                                    dq 6 + wide dk 4 = 10 (dKᵀ = Qᵀ·dS over all of D)
backward, general, atomic           6                   M·D fp32 (dK accumulator)      no, opt-in
backward, GEMM (dS blocks + cuBLAS) 2 + 4 (4 in cuBLAS) dS block ≤ 1 GiB + M·D fp32    yes  ← auto, large
backward, Gram, row-stationary      2n_d + 2            T fp32                         yes  ← auto, small
                                    = 4 for D ≤ 256, 6 for D = 512, 10 for D = 1024
backward, Gram, GEMM (G blocks)     2 + 2 (2 in cuBLAS) G block ≤ 1 GiB                yes  ← auto, large
backward, Gram, atomic              3                   B·D fp32 (dZ accumulator)      no, opt-in
backward, Gram, split (z, z.detach) 2·(2n_d + 2)        T fp32                         yes
==================================  ==================  =============================  =============

So symmetric CLIP costs 2 + 8 = 10 units for D ≤ 512 (16-bit) on the fused kernels and 2 + 6 on
the GEMM backward, a Gram loss 1 + 4 = 5 for D ≤ 256 on the fused kernels and 1 + 4 on the GEMM
backward at every D ("auto, small / large": ``backward_path``).  T_B = cdiv(B, BLOCK_M), T = cdiv(B, BLOCK).

Forward, general: a grid of (row tiles, column splits).  The number of
splits is chosen from the shape (``fwd_plan``): one while the row tiles
alone fill the GPU, else enough column chunks for about two programs per SM
(flash-decoding).  Program (t, s) runs the online LSE of its rows over its
columns and writes one partial LSE per row into ``RowPart[s]``, and, for the
column LSE, each tile's column partials into ``ColPart[t]`` and ``ColRef[t]``
(``tiles.rows_and_cols``: Σ exp(S − T) per column and the tile's maximum T
once per ``COL_REF_GROUP`` columns, or, where the tile's logits spread too
far, each column's LSE and a reference of +inf; every entry written once, an
LSE of −inf for columns outside the rows' ranges): no barriers, no
read-modify-write, no atomics.  torch merges the partials (``logsumexp`` over
the first axis, a fixed order; ``merge_col_part``).

Forward, Gram: each pair {a, b} of rows has ONE value, entry (min, max) of the
tile product Z_I·Z_Jᵀ with the lower-index tile on the left (the two fp32
roundings of z_a·z_b and z_b·z_a may differ, by up to 8 at logits ~1e8).  The
program of row tile I visits J = I (the diagonal tile, outside the loop) and
J > I: its rows' statistics take S_IJ[a, b] for b ≥ a online in registers;
rows J take the mirrored entries a < b as the column LSE of the tile, written
to ``Part[I, rows J]``; at the end ``Part[I, rows I]`` gets the row
statistics folded with the diagonal tile's column part, and ``Part[I, :I]``
is −inf.  A program owns tiles I and T−1−I, so every program does T + 1
tiles.  row_lse = logsumexp over the T partials.

Backward (deterministic, FlashAttention-2 style): with P_row = exp(S −
row_lse), P_col = exp(S − col_lse),

    dS = g_row·P_row + g_col·P_col   (allowed pairs, else 0)
    dQ = scale·dS·K,   dK = scale·dSᵀ·Q,   dscale = Σ dS ⊙ (Q Kᵀ).

The dq kernel is row-stationary (one program per row tile and output
D-chunk, a BLOCK_M × BLOCK_DO fp32 accumulator, the column tiles streamed);
the dk kernel is column-stationary (one program per column tile and output
chunk, a BLOCK_N × BLOCK_DO accumulator, the row tiles streamed).  Each
recomputes each S tile once per output chunk, and BLOCK_DO covers all of D
up to ``max_do``, so for D ≤ 512 each gradient costs S + one product = 4
units.  No float atomics.  The Gram backward is row-stationary over all
column tiles in three loops — J < I (the forward's tile Z_J·Z_Iᵀ, used
transposed), the diagonal tile (its lower triangle the transposed upper one),
J > I — with no dot product inside a runtime branch, and writes the whole
gradient of the one tensor (no dK kernel): 4 units.

Forward/backward consistency: the backward's P = exp(S − lse) is at most 1
only if each S it reads is bitwise the value the forward put into that LSE —
at logits ~1e8 one fp32 ulp is 8.  Hence every kernel forms S with
``s_tile`` and ``scaled_s`` (the same chunks, orientation and multiply), and
in a Gram matrix entry (a, b) is always read from the tile with the lower
index on the left.  For 16-bit inputs the forward and backward tiles may
differ in shape; every config is ≥ 64 rows with a multiple of 4 warps, so all
of them run ``wgmma`` with the same K-order of the sum.

Row threshold (``row_max``, optional, the ``HAS_ROW_MAX`` flag of every kernel): a pair is left out
when S > row_max[i], compared in ``tiles.under_row_max`` on the very product ``scaled_s``
exponentiates, so the forward and every backward drop the same pairs (ties within the rounding of
S, ``tf32x3`` for fp32 on the GPU, are decided on that S).  The Gram kernels compare each view of
an entry (a, b) with its own row's threshold (``under_row_max_t`` for the columns' view), on the
one value read from the tile with the lower index on the left.

Which backward runs (``backward_path``): with ``BACKWARD = "auto"`` (the default; module
attribute, or ``CONTRASTIVE_OPS_TRITON_BACKWARD`` at import) the GEMM backward where the cost
model of :mod:`.costs` — fed with the kernel times measured on an H200 — predicts it at least
``costs.MARGIN`` times faster (large shapes; no index lists, no column ranges),
else the fused deterministic kernels; ``"deterministic"`` and ``"gemm"`` force one of them;
``"atomic"`` takes the atomic kernels where ``torch.are_deterministic_algorithms_enabled()`` is off.

GEMM backward (``_gemm_backward``): on an H200 the dq/dk kernels ran at 98–138 TFLOP/s (4.2 + 3.7
ms of a 10.6 ms CLIP step at B = 16384, D = 512, bf16) while the forward tile loop ran at 237 and
cuBLAS at 760.  This backward keeps the forward's strength and hands the products to cuBLAS: per
block of rows, ``_bwd_ds_kernel`` (a forward-shaped 2-D grid of S tiles, no accumulator)
recomputes S once and stores dS rounded to the input dtype (as the dq/dk kernels round it before
their products); then dQ = scale·dS·K and dK += dSᵀ·Q (fp32 accumulation across blocks).  For a
Gram matrix the forward keeps the Gram kernel and ``_gram_ds_kernel`` reads each entry as it did
(the lower tile index on the left), storing G = dS + dSᵀ for a block of rows; one product
scale·G·Z then gives the gradient (``_gemm_gram_backward``: 2 + 2 units against 2 + 4).
``benchmarks/gpu_quick.py`` times ``triton`` (auto) beside ``triton:deterministic``, which checks
the choice.

Layers: the ``@triton.jit`` kernels (:mod:`.sim_lse_fwd`, :mod:`.sim_lse_bwd`; their names are
re-exported here) → the custom ops
``contrastive_ops_triton::sim_lse_fwd`` / ``sim_lse_bwd``
(``torch.library.triton_op``, so ``torch.compile`` traces into the kernels) →
``sim_lse_forward`` / ``sim_lse_backward`` → the primitive ``SIM_LSE`` used by
``contrastive_ops.primitives.sim_lse.SimLSEFunction``.  The Gram case is detected by the
primitive: ``q is k`` selects the Gram backward (the whole gradient in dq,
zeros in dk); two objects with the same data pointer, shape, strides and
dtype (``z``, ``z.detach()``) take the Gram forward and the split Gram
backward.  The ops live in their own namespace ``contrastive_ops_triton``
(the C++ extension owns ``contrastive_ops``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton

from .sim_lse_bwd import (  # noqa: F401 - the kernels, re-exported (tests, the compile gate)
    GRAM_DS_GPU, _bwd_atomic_kernel, _bwd_dk_kernel, _bwd_dk_wide_kernel, _bwd_dq_kernel, _bwd_ds_kernel,
    _gram_bwd_atomic_kernel, _gram_bwd_kernel, _gram_ds_kernel,
)
from .args import same_device, scalar_on
from .costs import declare_work, gemm_pays
from .sim_lse_fwd import _fwd_kernel, _gram_fwd_kernel
from .tiles import (
    BWD_ATOMIC_GPU, BWD_DQ_GPU, BWD_GPU, COL_REF_GROUP, DK_WIDE_GPU, DK_WIDE_MAX_D, DS_GPU, FWD_N_GPU, INTERP_BLOCK,
    INTERP_N, INTERP_SYM, LAUNCHES, SMEM_LIMIT, SPEC_DS, SPEC_DTYPES, SYM_ATOMIC_GPU, SYM_BWD_GPU, SYM_FWD_GPU,
    acc_fits, block_do, checked_backward, chunk_d, col_lse, d_pad, dot_flags, empty, fwd_smem, gemm_block_rows,
    gpu_block_do, gpu_chunk_d, gpu_dot_flags, interpreting, launch, gpu_choices, log2_bucket, mark_known_faults,
    matrix_writer, min_block, sm_count, spec,
)
from .products import mm_f32

Tensor = torch.Tensor

__all__ = ["SIM_LSE", "LAUNCHES", "POISON_OUTPUTS", "BACKWARD", "interpreting", "sim_lse_forward", "sim_lse_backward",
           "same_values", "backward_path", "gram_kernels_take", "compile_specs"]

# Tests flip this (or ``tiles.POISON_OUTPUTS``, which covers every Triton primitive) to allocate
# every sim_lse kernel output filled with NaN, so a tile a kernel forgets to write shows up.
POISON_OUTPUTS = False


def _empty(shape, dtype, device) -> Tensor:
    return empty(shape, dtype, device, poison=POISON_OUTPUTS)


# "auto" (default), "deterministic", "atomic" or "gemm": see the module docstring.
BACKWARD = os.environ.get("CONTRASTIVE_OPS_TRITON_BACKWARD", "auto")
_ATOMIC_MAX_D = 256  # the atomic kernels hold a BLOCK × next_pow2(D) fp32 accumulator


# ---------------------------------------------------------------------------
# Grid shapes and output chunks (the launchers', the performance model's)
# ---------------------------------------------------------------------------


def fwd_plan(B: int, M: int, device: torch.device, block_m: Optional[int] = None) -> Tuple[int, int, int]:
    """``(BLOCK_M, n_split, cols_per_split)`` of the general forward, from the shape.

    128-row tiles while they fill the SMs, else 64 (``block_m`` imposes one: the tile sweep of
    ``benchmarks/gpu_tile_sweep.py``); then, while the row tiles are fewer than about two per SM,
    the columns are split into chunks of at least ``min_cols`` (a multiple of every BLOCK_N) so
    the grid fills the GPU.
    """
    sms = sm_count(device)
    if interpreting():
        auto_m, align, min_cols = INTERP_BLOCK[0], INTERP_N[0], INTERP_N[0]
    else:
        auto_m = 128 if triton.cdiv(B, 128) >= sms else 64
        align, min_cols = 128, 1024
    block_m = block_m or auto_m
    t_b = triton.cdiv(B, block_m)
    want = max(1, triton.cdiv(2 * sms, max(t_b, 1)))
    n_split = max(1, min(want, M // min_cols))
    cps = triton.cdiv(triton.cdiv(max(M, 1), n_split), align) * align
    return block_m, triton.cdiv(max(M, 1), cps), cps


def gram_chunk_d(D: int, dtype: torch.dtype) -> int:
    """``chunk_d`` of the Gram kernels (forward, fused backward, G tiles), which form S alike: on the
    GPU 16-bit D of 33–128 streams two chunks (32 or 64 wide) instead of holding one tile (the fused
    Gram backward spills 4–540 B per thread with held 64- and 128-wide tiles on sm_90a, none with
    chunks)."""
    return gpu_gram_chunk_d(D, "fp32" if dtype == torch.float32 else "bf16") if not interpreting() else chunk_d(D)


def gpu_gram_chunk_d(D: int, dtype_name: str) -> int:
    """``gram_chunk_d`` as on the GPU (compile specs)."""
    bd = gpu_chunk_d(D, dtype_name)
    return bd // 2 if D <= bd and bd >= 64 else bd  # one chunk of 64 or 128 (16-bit): a held tile


def gram_block(B: int, device: torch.device) -> int:
    """Square tile of the Gram forward: 64 on the GPU (128 spills: two masked 128×128 fp32 copies of
    S live at once, 136–1,184 B per thread on sm_90a)."""
    return INTERP_SYM[0] if interpreting() else 64


# ---------------------------------------------------------------------------


def dk_wide(D: int, dtype: torch.dtype) -> bool:
    """Whether the dk kernel takes the transposed accumulator over all of D: 16-bit inputs (fp32's
    tf32x3 has no transposed operand on wgmma) whose padded D is 512 or 1024 on the GPU (at 512 the
    plain kernel's BLOCK_N × 512 accumulator spills on sm_90a; the transposed one is 512 × 32), over
    64 under the interpreter (its tests run both kernels)."""
    low = 128 if interpreting() else 512
    return low <= d_pad(D) <= DK_WIDE_MAX_D and dtype != torch.float32


def _pair_slots(device: torch.device, B: int) -> int:
    t = triton.cdiv(B, min_block())
    cap = 3 if device.type != "cuda" else 2 * sm_count(device)
    return max(1, min(cap, t * (t + 1) // 2))


def out_chunks(D: int, dtype: torch.dtype = torch.bfloat16, gram: bool = False) -> int:
    """n_d: the backward's output D-chunks (``cdiv(D, block_do)``), each recomputing S once.

    The backward launcher sizes its grids with it and ``WORK_UNITS`` counts the work with it
    (``benchmarks/perf_model.py``), so the model follows the code.
    """
    return triton.cdiv(D, block_do(D, dtype, gram))


# ---------------------------------------------------------------------------
# Custom ops and launchers
# ---------------------------------------------------------------------------


def _flags(q, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None) -> dict:
    return dict(
        HAS_ROW_INDEX=row_index is not None,
        HAS_COL_INDEX=col_index is not None,
        HAS_RANGE=col_start is not None or col_end is not None,
        N_EXCLUDE=0 if exclude is None else int(exclude.shape[1]),
        WANT_COL=bool(want_col),
        HAS_ROW_MAX=row_max is not None,
        **dot_flags(q.dtype),
    )


def _row_max_arg(row_max: Optional[Tensor], B: int) -> Optional[Tensor]:
    """``row_max`` as the kernels read it: (B,) fp32, contiguous."""
    if row_max is None:
        return None
    if tuple(row_max.shape) != (B,):
        raise ValueError(f"sim_lse: row_max must have shape ({B},), got {tuple(row_max.shape)}")
    return row_max.to(torch.float32).contiguous()


def _sizes(q, k, row_index, col_index) -> Tuple[int, int, int]:
    B = q.shape[0] if row_index is None else row_index.shape[0]
    M = k.shape[0] if col_index is None else col_index.shape[0]
    return B, M, q.shape[1]


def _ranges(q, B, M, col_start, col_end):
    """Fill in the missing half of a range with its default (0 or M)."""
    if col_start is None and col_end is None:
        return None, None
    if col_start is None:
        col_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    if col_end is None:
        col_end = torch.full((B,), M, dtype=torch.int32, device=q.device)
    return col_start, col_end


def _ptr(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    """Kernels take every pointer; a flag off means the argument is never read."""
    return fallback if t is None else t


# fp32 inputs on a GPU do not take the Gram kernels: compute-sanitizer found an out-of-bounds
# shared-memory read in _gram_bwd_kernel for fp32 (tf32x3) inputs with several row tiles, under
# Triton 3.6 on sm_90 (benchmarks/results/nvidia-h200-2026-12-04-diag/sanitizer-memcheck-pytest.log),
# and its fp32 variants spill 368-1,860 B.  There fp32 Gram losses run the general kernels, forward
# and backward alike (so the backward still reads the forward's S): 2 forward units instead of 1.
# Under the interpreter (CPU) every dtype keeps the Gram kernels, which the tests cover.
GRAM_FP32_ON_GPU = False


def gram_kernels_take(dtype: torch.dtype) -> bool:
    """Whether inputs of ``dtype`` may take the Gram kernels here (see ``GRAM_FP32_ON_GPU``)."""
    return dtype != torch.float32 or GRAM_FP32_ON_GPU or interpreting()


def _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) -> bool:
    """The Gram kernels cover q is k with no index lists, no ranges and no column LSE (and, on a
    GPU, 16-bit inputs: ``gram_kernels_take``).  A row threshold ``row_max`` is applied there too:
    each view of an entry (a, b) — row a's and row b's — is compared with its own row's threshold
    on the one value read from the tile with the lower index on the left, forward and backward alike.
    """
    return (bool(gram) and row_index is None and col_index is None and col_start is None
            and col_end is None and not want_col and q.shape == k.shape and gram_kernels_take(q.dtype))


# The GEMM backward's dS buffer: blocks of rows × all M columns, at most this many bytes.
GEMM_DS_BYTES = 1 << 30


def merge_col_part(col_part: Tensor, col_ref: Tensor) -> Tensor:
    """The column LSEs from the general forward's partials: per row tile, values (T_B, M) and
    references (T_B, cdiv(M, COL_REF_GROUP)); a partial is ref + log(value), or the value itself
    (an LSE) where its reference is +inf (``tiles.rows_and_cols``)."""
    ref = col_ref.repeat_interleave(int(COL_REF_GROUP), 1)[:, : col_part.shape[1]]
    return torch.logsumexp(torch.where(ref == float("inf"), col_part, ref + torch.log(col_part)), 0)


# Padding of ``ds_stats``: at least the largest tile of the dS kernel's configs (GPU and interpreter).
DS_STAT_PAD = 256


def ds_stats(lse: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor]:
    """The dS kernel's statistics: the LSEs with −inf as +inf (P = 0) and the gradients, both padded
    by ``DS_STAT_PAD`` entries (+inf, 0) so that a tile past the end reads them without masks."""
    n = lse.numel()
    lse_p = torch.full((n + DS_STAT_PAD,), float("inf"), dtype=torch.float32, device=lse.device)
    lse_p[:n] = torch.where(lse == float("-inf"), float("inf"), lse)
    grad_p = torch.zeros((n + DS_STAT_PAD,), dtype=torch.float32, device=grad.device)
    grad_p[:n] = grad
    return lse_p, grad_p


def _gemm_backward(q, k, scale, exclude, row_lse, col_lse, grad_row, grad_col, flags, bd, one_chunk, row_max=None):
    """The GEMM backward (``BACKWARD = "gemm"``; no index lists, no column ranges): for each block
    of rows, the dS kernel recomputes S once and stores dS (rounded to the input dtype, as the dq/dk
    kernels round it before their products), then cuBLAS does dQ = scale·dS·K and accumulates
    dK += dSᵀ·Q in fp32: 2 units of recompute on the Triton side and the two products at GEMM speed,
    against 8 units in the dq/dk kernels.  Extra memory: the dS block (≤ ``GEMM_DS_BYTES``) and an
    M × D fp32 accumulator.  dscale is Σ Q ⊙ (dS·K) from the fp32 product dQ is made of.
    Deterministic: every sum has a fixed order."""
    B, D = q.shape
    M = k.shape[0]
    rows_per = gemm_block_rows(B, M, q.element_size(), GEMM_DS_BYTES)
    dq = _empty(q.shape, q.dtype, q.device)
    dk_acc = torch.zeros((M, D), dtype=torch.float32, device=q.device)
    ds = _empty((rows_per, M), q.dtype, q.device)
    lse_r, g_r = ds_stats(row_lse, grad_row)
    lse_c, g_c = ds_stats(col_lse, grad_col) if col_lse is not None else (lse_r, g_r)
    parts = []
    for r0 in range(0, B, rows_per):
        r1 = min(B, r0 + rows_per)
        qc, dsc = q[r0:r1], ds[: r1 - r0]
        launch("bwd_ds", _bwd_ds_kernel,
               lambda meta, n=r1 - r0: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_N"])))(
            qc, k, scale, scale, scale, scale, scale, _ptr(None if exclude is None else exclude[r0:r1], scale),
            _ptr(None if row_max is None else row_max[r0:r1], scale), lse_r[r0:], lse_c, g_r[r0:], g_c, dsc,
            r1 - r0, M, D, q.stride(0), k.stride(0), dsc.stride(0), log2_bucket(B), log2_bucket(M),
            BLOCK_D=bd, ONE_CHUNK=one_chunk, **flags,
        )
        dsk = mm_f32(dsc, k)
        dq[r0:r1] = (dsk * scale).to(q.dtype)
        parts.append(torch.einsum("bd,bd->", dsk, qc.float()))  # Σ dS ⊙ (Q Kᵀ) = Σ Q ⊙ (dS·K)
        dk_acc += mm_f32(dsc.t(), qc)
    return dq, (dk_acc * scale).to(k.dtype), torch.stack(parts).sum()


def _gemm_gram_backward(z, scale, exclude, row_lse, grad_row, flags, bd, one_chunk, terms, row_max=None):
    """The GEMM backward of a Gram matrix (q is k, or k holds q's values): for each block of rows,
    ``_gram_ds_kernel`` reads S as the Gram forward did and stores G = dS + dSᵀ (``terms`` 3; 1: dS,
    for dq; 2: dSᵀ, for dk) rounded to the input dtype, then cuBLAS does scale·G·Z for those rows:
    2 units of recompute and one product of 2, against 4–10 in the Gram kernel and 6 in the general
    GEMM backward.  Returns (that gradient, dscale)."""
    B, D = z.shape
    unit = min_block()
    rows_per = gemm_block_rows(B, B, z.element_size(), GEMM_DS_BYTES)
    out = _empty(z.shape, z.dtype, z.device)
    gbuf = _empty((rows_per, B), z.dtype, z.device)
    parts = []
    for r0 in range(0, B, rows_per):
        r1 = min(B, r0 + rows_per)
        g = gbuf[: r1 - r0]
        part = torch.zeros(((triton.cdiv(r1 - r0, unit) + 1) * triton.cdiv(B, unit),), dtype=torch.float32,
                           device=z.device)
        launch("gram_ds", _gram_ds_kernel,
               lambda meta, r0=r0, r1=r1: (triton.cdiv(r1, meta["BLOCK"]) - r0 // meta["BLOCK"],
                                           triton.cdiv(B, meta["BLOCK"])))(
            z, scale, _ptr(exclude, scale), _ptr(row_max, scale), row_lse, grad_row, g, part,
            r0, r1, B, D, z.stride(0), g.stride(0), log2_bucket(B),
            N_EXCLUDE=flags["N_EXCLUDE"], UPCAST=flags["UPCAST"], PREC=flags["PREC"], BLOCK_D=bd,
            ONE_CHUNK=one_chunk, TERMS=terms, HAS_ROW_MAX=flags["HAS_ROW_MAX"],
        )
        out[r0:r1] = (mm_f32(g, z) * scale).to(z.dtype)
        parts.append(part.sum())
    return out, torch.stack(parts).sum()


def same_values(q: Tensor, k: Tensor) -> bool:
    """True when ``q`` and ``k`` hold the same values: the same tensor, or two views of one
    storage with the same data pointer, shape, strides and dtype.  Fake tensors (tracing)
    have no data pointer: there only ``q is k`` counts."""
    if q is k:
        return True
    if torch.compiler.is_compiling():
        return False
    try:
        return (q.device == k.device and q.dtype == k.dtype and q.shape == k.shape
                and q.stride() == k.stride() and q.data_ptr() == k.data_ptr())
    except RuntimeError:
        return False


def backward_path(D: int, B: int = 0, M: int = 0, dtype: torch.dtype = torch.bfloat16, gram: bool = False) -> str:
    """``"atomic"``, ``"gemm"`` or ``"deterministic"``: which backward the launcher takes for a
    (B, M, D) problem of ``dtype`` (module docstring; it takes "gemm" only where there are no index
    lists and no column ranges).  ``gram``: the Gram-kernel case (q is k), where "auto" weighs the
    Gram forward and backward against the general forward and the GEMM backward."""
    path = checked_backward(BACKWARD)
    fp32_gpu = dtype == torch.float32 and not interpreting()
    if path == "atomic":  # fp32's atomic kernels spill 32 B–8 KB per thread on sm_90a: the deterministic ones
        if D <= _ATOMIC_MAX_D and not torch.are_deterministic_algorithms_enabled() and not fp32_gpu:
            return "atomic"
        path = "deterministic"
    if gram and fp32_gpu:
        return "gemm"  # the fused fp32 Gram backward spills on sm_90a; the GEMM one is deterministic too
    if path == "auto":
        return "gemm" if gemm_pays(B, M, D, dtype, "gram" if gram else "general") else "deterministic"
    return path


@torch.library.triton_op("contrastive_ops_triton::sim_lse_fwd", mutates_args=())
def _sim_lse_fwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    want_col: bool, gram: bool = False, row_max: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``gram=True`` promises that ``k`` holds the same values as ``q`` (Gram kernel when it applies)."""
    same_device("sim_lse_fwd", q.device, k=k, row_index=row_index, col_index=col_index, col_start=col_start,
                col_end=col_end, exclude=exclude, row_max=row_max)
    scale = scalar_on("sim_lse_fwd", "scale", scale, q.device)
    B, M, D = _sizes(q, k, row_index, col_index)
    row_max = _row_max_arg(row_max, B)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col, row_max)
    bd = chunk_d(D, q.dtype)
    if _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) and B > 0:
        bd = gram_chunk_d(D, q.dtype)
        block = gram_block(B, q.device)
        T = triton.cdiv(B, block)
        part = _empty((T, B), torch.float32, q.device)  # every entry written once
        launch("gram_fwd", _gram_fwd_kernel, (triton.cdiv(T, 2),))(
            q, scale, _ptr(exclude, scale), _ptr(row_max, scale), part, B, D, q.stride(0), log2_bucket(B),
            N_EXCLUDE=flags["N_EXCLUDE"], UPCAST=flags["UPCAST"], PREC=flags["PREC"],
            BLOCK_D=bd, ONE_CHUNK=D <= bd, BLOCK=block, HAS_ROW_MAX=flags["HAS_ROW_MAX"],
        )
        return torch.logsumexp(part, 0), torch.empty((0,), dtype=torch.float32, device=q.device)
    if B == 0:
        col_lse = torch.full((M if want_col else 0,), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.empty((0,), dtype=torch.float32, device=q.device), col_lse
    block_m, n_split, cps = fwd_plan(B, M, q.device)
    t_b = triton.cdiv(B, block_m)
    row_part = _empty((n_split, B), torch.float32, q.device)
    # per row tile: a value per column and a reference per COL_REF_GROUP columns, every entry
    # written once (``rows_and_cols``)
    col_part = _empty((t_b if want_col else 0, M), torch.float32, q.device)
    col_ref = _empty((t_b if want_col else 0, triton.cdiv(M, int(COL_REF_GROUP))), torch.float32, q.device)
    launch("fwd", _fwd_kernel, (t_b, n_split))(
        q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
        _ptr(col_end, scale), _ptr(exclude, scale), _ptr(row_max, scale), row_part,
        _ptr(col_part if want_col else None, row_part), _ptr(col_ref if want_col else None, row_part),
        B, M, D, q.stride(0), k.stride(0), cps, log2_bucket(B), log2_bucket(M),
        BLOCK_D=bd, ONE_CHUNK=D <= bd, BLOCK_M=block_m, **flags,
    )
    row_lse = row_part[0] if n_split == 1 else torch.logsumexp(row_part, 0)
    if want_col:
        col_lse = merge_col_part(col_part, col_ref)
    else:
        col_lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return row_lse, col_lse


@_sim_lse_fwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, gram=False, row_max=None):
    B, M, _ = _sizes(q, k, row_index, col_index)
    return q.new_empty((B,), dtype=torch.float32), q.new_empty((M if want_col else 0,), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sim_lse_bwd", mutates_args=())
def _sim_lse_bwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
    gram: bool = False, atomic: bool = False, same: bool = False, row_max: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``gram=True`` promises that q *is* k for autograd: where the Gram kernel applies, the whole
    gradient of that one tensor is returned in dq and dk is zero.  ``same=True`` promises only that
    k holds q's values (the forward took the Gram kernel): where it applies, dq and dk come from
    the Gram kernel's separate terms, so the backward reads the forward's S.  ``atomic=True`` takes
    the single-recompute kernels (non-deterministic; D ≤ 256, else ignored)."""
    same_device("sim_lse_bwd", q.device, k=k, row_index=row_index, col_index=col_index, col_start=col_start,
                col_end=col_end, exclude=exclude, row_lse=row_lse, col_lse=col_lse, grad_row=grad_row,
                grad_col=grad_col, row_max=row_max)
    scale = scalar_on("sim_lse_bwd", "scale", scale, q.device)
    want_col = col_lse.numel() > 0
    B, M, D = _sizes(q, k, row_index, col_index)
    row_max = _row_max_arg(row_max, B)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col, row_max)
    launch_any = B > 0 and M > 0
    atomic = bool(atomic) and D <= _ATOMIC_MAX_D
    bd, bdo, gram_bdo = chunk_d(D, q.dtype), block_do(D, q.dtype), block_do(D, q.dtype, gram=True)
    one_chunk = D <= bd
    gbd = gram_chunk_d(D, q.dtype)  # the Gram kernels' S chunks
    g_one = D <= gbd
    n_d, gram_n_d = out_chunks(D, q.dtype), out_chunks(D, q.dtype, gram=True)
    reuse = one_chunk and n_d == 1 and bdo == bd
    dot_kw = dict(UPCAST=flags["UPCAST"], PREC=flags["PREC"])
    gram_kw = dict(N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=gbd, BLOCK_DO=gram_bdo, ONE_CHUNK=g_one,
                   REUSE=g_one and gram_n_d == 1 and gram_bdo == gbd, HAS_ROW_MAX=flags["HAS_ROW_MAX"], **dot_kw)
    n_parts = triton.cdiv(B, min_block())
    gram_gemm = not atomic and backward_path(D, B, B, q.dtype, gram=True) == "gemm"

    def gram_rows(terms: int, name: str, dscale_part: Tensor) -> Tensor:
        out = _empty(q.shape, q.dtype, q.device)
        launch(name, _gram_bwd_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK"]), gram_n_d))(
            q, scale, _ptr(exclude, scale), _ptr(row_max, scale), row_lse, grad_row, out, dscale_part,
            B, D, q.stride(0), out.stride(0), log2_bucket(B), TERMS=terms, **gram_kw,
        )
        return out

    if not gram and same and _gram_applies(True, q, k, row_index, col_index, col_start, col_end, want_col):
        # k holds q's values but is another tensor for autograd (e.g. z.detach()): dq = scale·dS·K
        # and dk = scale·dSᵀ·Q from the Gram kernel's two terms (the forward's S, read the same way).
        if not launch_any:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros((), dtype=torch.float32, device=q.device)
        if gram_gemm:
            dq, dscale = _gemm_gram_backward(q, scale, exclude, row_lse, grad_row, flags, gbd, g_one, 1, row_max)
            dk, _ = _gemm_gram_backward(q, scale, exclude, row_lse, grad_row, flags, gbd, g_one, 2, row_max)
            return dq, dk, dscale
        dscale_part = torch.zeros((n_parts,), dtype=torch.float32, device=q.device)
        dq = gram_rows(1, "gram_bwd_dq", dscale_part)
        dk = gram_rows(2, "gram_bwd_dk", torch.zeros_like(dscale_part))
        return dq, dk, dscale_part.sum()

    if _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col):
        dk = torch.zeros_like(k)
        if not launch_any:
            return torch.zeros_like(q), dk, torch.zeros((), dtype=torch.float32, device=q.device)
        if atomic:
            slots = _pair_slots(q.device, B)
            dz_acc = torch.zeros((B, D), dtype=torch.float32, device=q.device)
            dscale_part = _empty((slots,), torch.float32, q.device)
            launch("gram_bwd_atomic", _gram_bwd_atomic_kernel, (slots,))(
                q, scale, _ptr(exclude, scale), _ptr(row_max, scale), row_lse, grad_row, dz_acc, dscale_part,
                B, D, q.stride(0), dz_acc.stride(0), log2_bucket(B),
                N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=gbd, ONE_CHUNK=g_one, BLOCK_DP=d_pad(D),
                HAS_ROW_MAX=flags["HAS_ROW_MAX"], **dot_kw,
            )
            return dz_acc.to(q.dtype), dk, dscale_part.sum()
        if gram_gemm:
            dz, dscale = _gemm_gram_backward(q, scale, exclude, row_lse, grad_row, flags, gbd, g_one, 3, row_max)
            return dz, dk, dscale
        dscale_part = torch.zeros((n_parts,), dtype=torch.float32, device=q.device)
        dz = gram_rows(3, "gram_bwd", dscale_part)
        return dz, dk, dscale_part.sum()

    if (backward_path(D, B, M, q.dtype) == "gemm" and launch_any and not flags["HAS_ROW_INDEX"]
            and not flags["HAS_COL_INDEX"] and not flags["HAS_RANGE"]):
        return _gemm_backward(q, k, scale, exclude, row_lse, col_lse if want_col else None, grad_row,
                              grad_col if want_col else None, flags, bd, one_chunk, row_max)

    # Rows outside an index list get no gradient: those outputs start at zero.
    dq = _empty(q.shape, q.dtype, q.device) if row_index is None and launch_any else torch.zeros_like(q)
    dscale_part = torch.zeros((n_parts,), dtype=torch.float32, device=q.device)
    common = (q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
              _ptr(col_end, scale), _ptr(exclude, scale), _ptr(row_max, scale), row_lse,
              _ptr(col_lse if want_col else None, row_lse),
              grad_row, _ptr(grad_col if want_col else None, grad_row))
    buckets = (log2_bucket(B), log2_bucket(M))
    if atomic:
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        if launch_any:
            launch("bwd_atomic", _bwd_atomic_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),))(
                *common, dq, dk_acc, dscale_part, B, M, D, q.stride(0), k.stride(0), dq.stride(0),
                dk_acc.stride(0), *buckets, BLOCK_D=bd, ONE_CHUNK=one_chunk, BLOCK_DP=d_pad(D), **flags,
            )
        return dq, dk_acc.to(k.dtype), dscale_part.sum()
    dk = _empty(k.shape, k.dtype, k.device) if col_index is None and launch_any else torch.zeros_like(k)
    if launch_any:
        launch("bwd_dq", _bwd_dq_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_d))(
            *common, dq, dscale_part, B, M, D, q.stride(0), k.stride(0), dq.stride(0), *buckets,
            BLOCK_D=bd, BLOCK_DO=bdo, ONE_CHUNK=one_chunk, REUSE=reuse, **flags,
        )
        if dk_wide(D, q.dtype):
            launch("bwd_dk_wide", _bwd_dk_wide_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), 1))(
                *common, dk, B, M, D, q.stride(0), k.stride(0), dk.stride(0), *buckets,
                BLOCK_D=bd, BLOCK_DO=d_pad(D), ONE_CHUNK=one_chunk, REUSE=False, DK_T=True, **flags,
            )
        else:
            launch("bwd_dk", _bwd_dk_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), n_d))(
                *common, dk, B, M, D, q.stride(0), k.stride(0), dk.stride(0), *buckets,
                BLOCK_D=bd, BLOCK_DO=bdo, ONE_CHUNK=one_chunk, REUSE=reuse, DK_T=False, **flags,
            )
    return dq, dk, dscale_part.sum()


@_sim_lse_bwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col,
      gram=False, atomic=False, same=False, row_max=None):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def sim_lse_forward(q, k, scale, row_index=None, col_index=None, col_start=None, col_end=None,
                    exclude=None, want_col=False, *, gram: Optional[bool] = None,
                    row_max: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Row (B,) and column (M,) LSEs in fp32; the column one is 0-element unless ``want_col``.

    ``gram``: None detects it (``same_values(q, k)``); the Gram kernel runs when
    it is true and there are no index lists, no ranges and no column LSE.
    """
    if gram is None:
        gram = same_values(q, k)
    return torch.ops.contrastive_ops_triton.sim_lse_fwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col), bool(gram), row_max)


def sim_lse_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                     row_lse, col_lse, grad_row, grad_col, *, gram: Optional[bool] = None,
                     atomic: Optional[bool] = None, same: Optional[bool] = None,
                     row_max: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq like q, dk like k, dscale 0-dim fp32)`` for upstream gradients ``grad_row``/``grad_col``.

    ``gram``: None means ``q is k`` (then, where the Gram kernel applies, dq is the
    whole gradient of the one tensor and dk is zero; their sum is the gradient
    either way).  ``same``: None means ``same_values(q, k)``, the forward's
    test: where the forward took the Gram kernel, the backward must read S the
    way it did.  ``atomic``: None means ``backward_path(D) == "atomic"``.
    """
    if gram is None:
        gram = q is k
    if same is None:
        same = same_values(q, k)
    if atomic is None:
        atomic = backward_path(q.shape[1], dtype=q.dtype) == "atomic"
    return torch.ops.contrastive_ops_triton.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, grad_row.float().contiguous(), grad_col.float().contiguous(), bool(gram), bool(atomic),
        bool(gram or same), row_max)


class _SimLSEPrimitive:
    """The ``"sim_lse"`` primitive of the Triton backend (see ``contrastive_ops.primitives.sim_lse``)."""

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        gram = same_values(q, k)
        return sim_lse_forward(q.contiguous(), k.contiguous(), scale.float().reshape(()), row_index,
                               col_index, col_start, col_end, exclude, want_col, gram=gram, row_max=row_max)

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col, row_max=None):
        gram = q is k  # one tensor for autograd: dq + dk is what it receives
        same = same_values(q, k)  # the forward's test: it took the Gram kernel
        dq, dk, dscale = sim_lse_backward(q.contiguous(), k.contiguous(), scale.float().reshape(()),
                                          row_index, col_index, col_start, col_end, exclude,
                                          row_lse, col_lse, grad_row, grad_col, gram=gram, same=same,
                                          row_max=row_max)
        return dq, dk, dscale.to(scale.dtype)


SIM_LSE = _SimLSEPrimitive()


# ---------------------------------------------------------------------------
# Work per path (read by benchmarks/perf_model.py), from the launchers' own chunking
# ---------------------------------------------------------------------------


def bwd_work(D: int, dtype: torch.dtype = torch.bfloat16, gram: bool = False) -> Tuple[int, float]:
    """``(units, S evaluations per pair)`` of the deterministic backward on the GPU: units of
    B·M·D FLOPs (a multiply-add is 2), from ``out_chunks`` and ``dk_wide`` as the launcher runs them.

    Each program of a row-stationary (dq, Gram) or column-stationary (dk) kernel recomputes
    S (2 units) per output chunk and adds its chunk's share of the gradient product (2 units
    over all chunks): 2·n_d + 2 per kernel; the wide dk kernel takes all of D in one chunk (4).
    General: dq + dk = 8 for 16-bit D ≤ 512, 6 + 4 = 10 at D = 768 and 1024 (n_d = 2, wide
    dk); fp32: n_d = cdiv(D, 128) for both.  Gram: 2·n_d + 2 with the Gram cap of 256 (4 for
    D ≤ 256, 6 at 512, 10 at 1024).
    """
    if gram:
        n = out_chunks(D, dtype, gram=True)
        return 2 * n + 2, n
    n = out_chunks(D, dtype)
    wide = dk_wide(D, dtype)
    return (2 * n + 2) + (4 if wide else 2 * n + 2), n + (1 if wide else n)


def _gpu_work(dtype_name: str, D: int, gram: bool, i: int) -> float:
    with _gpu_dispatch():
        return bwd_work(D, SPEC_DTYPES[dtype_name], gram)[i]


class _gpu_dispatch:
    """``block_do`` / ``dk_wide`` answer for the GPU (not the interpreter) inside this block."""

    def __enter__(self):
        self.old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.old


# Units of B·M·D per path, and S evaluations per (i, j) pair: the forward evaluates S once
# (2 units: QKᵀ; the row and column LSE read the same tile), the Gram forward once per pair
# {a, b} (tiles J ≥ I: half of S, 1 unit).  Callables take (D, dtype name).
WORK_UNITS = {
    "general_fwd": 2,
    "gram_fwd": 1,
    "general_bwd": lambda D, dtype="bf16": _gpu_work(dtype, D, False, 0),
    "gram_bwd": lambda D, dtype="bf16": _gpu_work(dtype, D, True, 0),
    "general_bwd_gemm": 6,  # dS kernel 2, cuBLAS dS·K and dSᵀ·Q 2 + 2
    "gram_bwd_gemm": 4,     # G = dS + dSᵀ kernel 2 (every tile, both views), cuBLAS G·Z 2
}
S_EVALS = {
    "general_fwd": 1,
    "gram_fwd": 0.5,
    "general_bwd": lambda D, dtype="bf16": _gpu_work(dtype, D, False, 1),
    "gram_bwd": lambda D, dtype="bf16": _gpu_work(dtype, D, True, 1),
    "general_bwd_gemm": 1,
    "gram_bwd_gemm": 1,
}
declare_work(WORK_UNITS)


# ---------------------------------------------------------------------------
# Compile specifications: every (kernel, config) the dispatcher can pick on sm_90a
# ---------------------------------------------------------------------------


# Variants the sm_90a compile gate measures failing, per Triton minor version (each compiles with
# its own ptxas: the same kernel spills more, less or not at all under another; ``python -m
# contrastive_ops.backends._triton.specs --faults`` under that Triton re-measures its table):
# (kernel, dtype, the D that share the binary, config as ``tiles.spec_config``) -> the measured
# fault.  compile_specs marks the installed Triton's entries ``expect_fail``: the gate's rows are
# xfail(strict=True), red again once a kernel is fixed.
_GATE_FAULTS = {
    "3.6": {
        ("sim_lse_bwd_atomic", "bf16", (256,), "128x64 w8 s2"): "spills 276 B stored / 260 B loaded",
        ("sim_lse_bwd_atomic", "bf16", (256,), "64x64 w4 s2"): "spills 1948 B stored / 1420 B loaded",
        ("sim_lse_bwd_atomic", "fp16", (256,), "128x64 w8 s2"): "spills 276 B stored / 260 B loaded",
        ("sim_lse_bwd_atomic", "fp16", (256,), "64x64 w4 s2"): "spills 1948 B stored / 1420 B loaded",
        ("sim_lse_bwd_dk", "bf16", (256,), "64x128 w8 s2"): "spills 64 B stored / 48 B loaded",
        ("sim_lse_bwd_dk", "bf16", (256,), "64x64 w4 s2"): "spills 100 B stored / 84 B loaded",
        ("sim_lse_bwd_dk", "fp16", (256,), "64x128 w8 s2"): "spills 64 B stored / 48 B loaded",
        ("sim_lse_bwd_dk", "fp16", (256,), "64x64 w4 s2"): "spills 100 B stored / 84 B loaded",
        ("sim_lse_bwd_dk", "fp32", (64,), "64x128 w8 s2"): "spills 24 B stored / 24 B loaded",
        ("sim_lse_bwd_dk", "fp32", (128, 256, 512, 768, 1024), "64x128 w8 s2"): "spills 116 B stored / 84 B loaded",
        ("sim_lse_bwd_dk", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 56 B stored / 32 B loaded",
        ("sim_lse_bwd_dq", "bf16", (256,), "128x64 w8 s2"): "spills 32 B stored / 16 B loaded",
        ("sim_lse_bwd_dq", "bf16", (256,), "64x64 w4 s2"): "spills 116 B stored / 92 B loaded",
        ("sim_lse_bwd_dq", "bf16", (512, 768, 1024), "64x64 w8 s2"): "spills 16 B stored / 8 B loaded",
        ("sim_lse_bwd_dq", "fp16", (256,), "128x64 w8 s2"): "spills 32 B stored / 16 B loaded",
        ("sim_lse_bwd_dq", "fp16", (256,), "64x64 w4 s2"): "spills 116 B stored / 92 B loaded",
        ("sim_lse_bwd_dq", "fp16", (512, 768, 1024), "64x64 w8 s2"): "spills 16 B stored / 8 B loaded",
        ("sim_lse_bwd_dq", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 24 B stored / 12 B loaded",
        ("sim_lse_bwd_dq", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 148 B stored / 100 B loaded",
        ("sim_lse_gram_bwd", "bf16", (64,), "128 w8 s2"): "spills 1092 B stored / 1484 B loaded",
        ("sim_lse_gram_bwd", "bf16", (128,), "128 w8 s2"): "spills 1960 B stored / 2444 B loaded",
        ("sim_lse_gram_bwd", "bf16", (128,), "64 w4 s2"): "spills 140 B stored / 156 B loaded",
        ("sim_lse_gram_bwd", "bf16", (256, 512, 768, 1024), "128 w8 s2"): "spills 4132 B stored / 4956 B loaded",
        ("sim_lse_gram_bwd", "bf16", (256, 512, 768, 1024), "64 w4 s2"): "spills 888 B stored / 1076 B loaded",
        ("sim_lse_gram_bwd", "fp16", (64,), "128 w8 s2"): "spills 1092 B stored / 1484 B loaded",
        ("sim_lse_gram_bwd", "fp16", (128,), "128 w8 s2"): "spills 1960 B stored / 2444 B loaded",
        ("sim_lse_gram_bwd", "fp16", (128,), "64 w4 s2"): "spills 140 B stored / 156 B loaded",
        ("sim_lse_gram_bwd", "fp16", (256, 512, 768, 1024), "128 w8 s2"): "spills 4132 B stored / 4956 B loaded",
        ("sim_lse_gram_bwd", "fp16", (256, 512, 768, 1024), "64 w4 s2"): "spills 888 B stored / 1076 B loaded",
        ("sim_lse_gram_bwd_atomic", "bf16", (64,), "128 w8 s1"):
            "spills 740 B stored / 680 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (128,), "128 w8 s1"):
            "spills 1168 B stored / 1144 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (256,), "128 w8 s1"):
            "spills 4536 B stored / 3760 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (256,), "64 w4 s2"): "spills 3052 B stored / 2276 B loaded",
        ("sim_lse_gram_bwd_atomic", "fp16", (64,), "128 w8 s1"):
            "spills 740 B stored / 680 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (128,), "128 w8 s1"):
            "spills 1168 B stored / 1144 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (256,), "128 w8 s1"):
            "spills 4536 B stored / 3760 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (256,), "64 w4 s2"): "spills 3052 B stored / 2276 B loaded",
    },
    "3.8": {
        ("sim_lse_bwd_atomic", "bf16", (256,), "128x64 w8 s2"): "spills 300 B stored / 284 B loaded",
        ("sim_lse_bwd_atomic", "bf16", (256,), "64x64 w4 s2"): "spills 1948 B stored / 1420 B loaded",
        ("sim_lse_bwd_atomic", "fp16", (256,), "128x64 w8 s2"): "spills 292 B stored / 276 B loaded",
        ("sim_lse_bwd_atomic", "fp16", (256,), "64x64 w4 s2"): "spills 1952 B stored / 1424 B loaded",
        ("sim_lse_bwd_dk", "bf16", (256,), "64x128 w8 s2"): "spills 64 B stored / 48 B loaded",
        ("sim_lse_bwd_dk", "bf16", (256,), "64x64 w4 s2"): "spills 100 B stored / 84 B loaded",
        ("sim_lse_bwd_dk", "fp16", (256,), "64x128 w8 s2"): "spills 64 B stored / 48 B loaded",
        ("sim_lse_bwd_dk", "fp16", (256,), "64x64 w4 s2"): "spills 100 B stored / 84 B loaded",
        ("sim_lse_bwd_dk", "fp32", (128, 256, 512, 768, 1024), "64x128 w8 s2"): "spills 104 B stored / 72 B loaded",
        ("sim_lse_bwd_dk", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 60 B stored / 36 B loaded",
        ("sim_lse_bwd_dq", "bf16", (256,), "128x64 w8 s2"): "spills 48 B stored / 32 B loaded",
        ("sim_lse_bwd_dq", "bf16", (256,), "64x64 w4 s2"): "spills 112 B stored / 88 B loaded",
        ("sim_lse_bwd_dq", "fp16", (256,), "128x64 w8 s2"): "spills 88 B stored / 68 B loaded",
        ("sim_lse_bwd_dq", "fp16", (256,), "64x64 w4 s2"): "spills 140 B stored / 116 B loaded",
        ("sim_lse_bwd_dq", "fp32", (64,), "64x64 w4 s2"): "spills 40 B stored / 20 B loaded",
        ("sim_lse_bwd_dq", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 32 B stored / 16 B loaded",
        ("sim_lse_bwd_dq", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 156 B stored / 100 B loaded",
        ("sim_lse_gram_bwd", "bf16", (64,), "128 w8 s2"): "spills 556 B stored / 780 B loaded",
        ("sim_lse_gram_bwd", "bf16", (128,), "128 w8 s2"): "spills 1312 B stored / 1700 B loaded",
        ("sim_lse_gram_bwd", "bf16", (128,), "64 w4 s2"): "spills 80 B stored / 60 B loaded",
        ("sim_lse_gram_bwd", "bf16", (256, 512, 768, 1024), "128 w8 s2"): "spills 3840 B stored / 4888 B loaded",
        ("sim_lse_gram_bwd", "bf16", (256, 512, 768, 1024), "64 w4 s2"): "spills 624 B stored / 808 B loaded",
        ("sim_lse_gram_bwd", "fp16", (64,), "128 w8 s2"): "spills 904 B stored / 1280 B loaded",
        ("sim_lse_gram_bwd", "fp16", (128,), "128 w8 s2"): "spills 1416 B stored / 1800 B loaded",
        ("sim_lse_gram_bwd", "fp16", (128,), "64 w4 s2"): "spills 80 B stored / 60 B loaded",
        ("sim_lse_gram_bwd", "fp16", (256, 512, 768, 1024), "128 w8 s2"): "spills 3540 B stored / 4148 B loaded",
        ("sim_lse_gram_bwd", "fp16", (256, 512, 768, 1024), "64 w4 s2"): "spills 1088 B stored / 1312 B loaded",
        ("sim_lse_gram_bwd_atomic", "bf16", (64,), "128 w8 s1"):
            "spills 248 B stored / 176 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (128,), "128 w8 s1"):
            "spills 936 B stored / 820 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (128,), "64 w4 s2"): "spills 24 B stored / 20 B loaded",
        ("sim_lse_gram_bwd_atomic", "bf16", (256,), "128 w8 s1"):
            "spills 3352 B stored / 2576 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "bf16", (256,), "64 w4 s2"): "spills 3044 B stored / 2268 B loaded",
        ("sim_lse_gram_bwd_atomic", "fp16", (64,), "128 w8 s1"):
            "spills 584 B stored / 544 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (128,), "128 w8 s1"):
            "spills 992 B stored / 968 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (128,), "64 w4 s2"): "spills 128 B stored / 72 B loaded",
        ("sim_lse_gram_bwd_atomic", "fp16", (256,), "128 w8 s1"):
            "spills 3644 B stored / 2868 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("sim_lse_gram_bwd_atomic", "fp16", (256,), "64 w4 s2"): "spills 3044 B stored / 2268 B loaded",
    },
}


def compile_specs() -> List[dict]:
    """One entry per (kernel, config, dtype, D) the GPU dispatcher can pick, for D in
    ``tiles.SPEC_DS`` and bf16/fp16/fp32, with the CLIP flags (no index lists, no
    ranges, no exclusions, column LSE) for the general kernels and one exclusion
    for the Gram kernels (NT-Xent); the opt-in atomic kernels for 16-bit D ≤ 256.  fp32 has
    no atomic and no fused Gram backward on the GPU (``backward_path``)."""
    out = []
    gen = dict(HAS_ROW_INDEX=False, HAS_COL_INDEX=False, HAS_RANGE=False, N_EXCLUDE=0, WANT_COL=True,
               HAS_ROW_MAX=False)
    for dname in SPEC_DTYPES:
        flags = gpu_dot_flags(dname)
        elem = 4 if dname == "fp32" else 2
        for D in SPEC_DS:
            bd, bdo = gpu_chunk_d(D, dname), gpu_block_do(D, dname)
            one = D <= bd
            gbd = gpu_gram_chunk_d(D, dname)  # the Gram kernels' S chunks
            g_one = D <= gbd
            n_d = triton.cdiv(D, bdo)
            reuse = one and n_d == 1 and bdo == bd
            elem = 4 if dname == "fp32" else 2
            for block_m in (128, 64):
                for (bn,), w, st in gpu_choices(FWD_N_GPU, dname):
                    c = dict(gen, **flags, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_M=block_m, BLOCK_N=bn)
                    if fwd_smem(block_m, bn, bd, st, elem) > SMEM_LIMIT:
                        continue
                    out.append(spec("sim_lse_fwd", _fwd_kernel.fn, dname, D, c, w, st))
            for block in (64,):
                for _, w, st in SYM_FWD_GPU:
                    c = dict(N_EXCLUDE=1, **flags, BLOCK_D=gbd, ONE_CHUNK=g_one, BLOCK=block, HAS_ROW_MAX=False)
                    if fwd_smem(block, block, gbd, st, elem) > SMEM_LIMIT:
                        continue
                    out.append(spec("sim_lse_gram_fwd", _gram_fwd_kernel.fn, dname, D, c, w, st))
            bwd = dict(BLOCK_D=bd, BLOCK_DO=bdo, ONE_CHUNK=one, REUSE=reuse)
            with _gpu_dispatch():
                wide = dk_wide(D, SPEC_DTYPES[dname])
            for (bm, bn), w, st in BWD_DQ_GPU:
                c = dict(gen, **flags, **bwd, BLOCK_M=bm, BLOCK_N=bn)
                if acc_fits(c, w, bdo):
                    out.append(spec("sim_lse_bwd_dq", _bwd_dq_kernel.fn, dname, D, c, w, st))
            for (bm, bn), w, st in BWD_GPU if not wide else ():
                c = dict(gen, **flags, **bwd, BLOCK_M=bm, BLOCK_N=bn, DK_T=False)
                if acc_fits(c, w, bdo):
                    out.append(spec("sim_lse_bwd_dk", _bwd_dk_kernel.fn, dname, D, c, w, st))
            if wide:
                for (bm, bn), w, st in DK_WIDE_GPU:
                    c = dict(gen, **flags, BLOCK_D=bd, BLOCK_DO=d_pad(D), ONE_CHUNK=one,
                             REUSE=False, DK_T=True, BLOCK_M=bm, BLOCK_N=bn)
                    if not acc_fits(c, w, d_pad(D)):
                        continue
                    out.append(spec("sim_lse_bwd_dk_wide", _bwd_dk_kernel.fn, dname, D, c, w, st))
            for (bm, bn), w, st in gpu_choices(DS_GPU, dname):
                c = dict(gen, **flags, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_M=bm, BLOCK_N=bn)
                if fwd_smem(bm, bn, bd, st, elem) > SMEM_LIMIT:
                    continue
                # one tile pair per program: with D in one chunk there is no loop to pipeline
                out.append(dict(matrix_writer(spec("sim_lse_bwd_ds", _bwd_ds_kernel.fn, dname, D, c, w, st)),
                                streaming=not one))
            for (blk,), w, st in GRAM_DS_GPU:
                c = dict(N_EXCLUDE=1, **flags, BLOCK_D=gbd, ONE_CHUNK=g_one, TERMS=3, BLOCK=blk, HAS_ROW_MAX=False)
                if fwd_smem(blk, blk, gbd, st, elem) > SMEM_LIMIT:
                    continue
                # one tile pair per program, as the dS kernel
                out.append(dict(matrix_writer(spec("sim_lse_gram_ds", _gram_ds_kernel.fn, dname, D, c, w, st)),
                                streaming=not g_one))
            gbdo = gpu_block_do(D, dname, gram=True)
            gram_bwd = dict(BLOCK_D=gbd, BLOCK_DO=gbdo, ONE_CHUNK=g_one, REUSE=g_one and D <= gbdo and gbdo == gbd)
            for (blk,), w, st in SYM_BWD_GPU if dname != "fp32" else ():  # fp32: the GEMM Gram backward
                c = dict(N_EXCLUDE=1, **flags, **gram_bwd, TERMS=3, BLOCK=blk, HAS_ROW_MAX=False)
                if not acc_fits(c, w, gbdo):
                    continue
                out.append(spec("sim_lse_gram_bwd", _gram_bwd_kernel.fn, dname, D, c, w, st))
            if D <= _ATOMIC_MAX_D and dname != "fp32":  # the opt-in atomic backwards, 16-bit (``backward_path``)
                for (bm, bn), w, st in BWD_ATOMIC_GPU:
                    c = dict(gen, **flags, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_DP=d_pad(D), BLOCK_M=bm, BLOCK_N=bn)
                    out.append(spec("sim_lse_bwd_atomic", _bwd_atomic_kernel.fn, dname, D, c, w, st))
                for (blk,), w, st in SYM_ATOMIC_GPU:
                    c = dict(N_EXCLUDE=1, **flags, BLOCK_D=gbd, ONE_CHUNK=g_one, BLOCK_DP=d_pad(D), BLOCK=blk,
                             HAS_ROW_MAX=False)
                    out.append(spec("sim_lse_gram_bwd_atomic", _gram_bwd_atomic_kernel.fn, dname, D, c, w, st))
    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/sim_lse.py")
