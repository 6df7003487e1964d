r"""Triton kernels of the similarity-LSE core (primitive ``"sim_lse"``).

The maths is the contract of :mod:`contrastive_ops.core`::

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
backward, general, dq + dk kernels  2·(2n_d + 2)        T_B fp32 (dscale parts)        yes  ← default
                                    = 8 for D ≤ 512 (16-bit); for D = 768, 1024 (16-bit)
                                    dq 6 + wide dk 4 = 10 (dKᵀ = Qᵀ·dS over all of D)
backward, general, atomic           6                   M·D fp32 (dK accumulator)      no, opt-in
backward, Gram, row-stationary      2n_d + 2            T fp32                         yes  ← default
                                    = 4 for D ≤ 256, 6 for D = 512, 10 for D = 1024
backward, Gram, atomic              3                   B·D fp32 (dZ accumulator)      no, opt-in
backward, Gram, split (z, z.detach) 2·(2n_d + 2)        T fp32                         yes
==================================  ==================  =============================  =============

So symmetric CLIP costs 2 + 8 = 10 units for D ≤ 512 (16-bit) and a Gram loss
1 + 4 = 5 for D ≤ 256.  T_B = cdiv(B, BLOCK_M), T = cdiv(B, BLOCK).

Forward, general: a grid of (row tiles, column splits).  The number of
splits is chosen from the shape (``fwd_plan``): one while the row tiles
alone fill the GPU, else enough column chunks for about two programs per SM
(flash-decoding).  Program (t, s) runs the online LSE of its rows over its
columns and writes one partial LSE per row into ``RowPart[s]``, and, for the
column LSE, each tile's column LSE into ``ColPart[t]`` (every entry written
once, −inf for columns outside the rows' ranges): no barriers, no
read-modify-write, no atomics.  torch merges the partials (``logsumexp`` over
the first axis, a fixed order).

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

Which backward runs (``backward_path``): the deterministic kernels unless the
atomic path is asked for with ``BACKWARD = "atomic"`` (module attribute, or
``CONTRASTIVE_OPS_TRITON_BACKWARD=atomic`` at import) and
``torch.are_deterministic_algorithms_enabled()`` is off.

Layers: the ``@triton.jit`` kernels → the custom ops
``contrastive_ops_triton::sim_lse_fwd`` / ``sim_lse_bwd``
(``torch.library.triton_op``, so ``torch.compile`` traces into the kernels) →
``sim_lse_forward`` / ``sim_lse_backward`` → the primitive ``SIM_LSE`` used by
``contrastive_ops.core._SimLSE``.  The Gram case is detected by the
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
import triton.language as tl

from .tiles import (
    BWD_ATOMIC_GPU, BWD_GPU, DK_WIDE_GPU, DK_WIDE_MAX_D, FWD_N_GPU, INTERP_BLOCK, INTERP_N, INTERP_SYM, LAUNCHES,
    SMEM_LIMIT, SPEC_DS, SPEC_DTYPES, SYM_ATOMIC_GPU, SYM_BWD_GPU, SYM_FWD_GPU, acc_fits, allowed, allowed_t,
    autotune, block_do, chunk_d, col_bounds, col_lse, col_tile, configs, d_pad, dot_flags, empty, fwd_smem,
    gpu_block_do, gpu_chunk_d, gpu_dot_flags, interpreting, launch, load_tile, log2_bucket, logaddexp, lse_of,
    min_block, online_rows, row_tile, s_tile, scaled_s, sm_count, spec,
)

Tensor = torch.Tensor

__all__ = ["SIM_LSE", "LAUNCHES", "POISON_OUTPUTS", "BACKWARD", "interpreting", "sim_lse_forward", "sim_lse_backward",
           "same_values", "backward_path", "compile_specs"]

# Tests flip this (or ``tiles.POISON_OUTPUTS``, which covers every Triton primitive) to allocate
# every sim_lse kernel output filled with NaN, so a tile a kernel forgets to write shows up.
POISON_OUTPUTS = False


def _empty(shape, dtype, device) -> Tensor:
    return empty(shape, dtype, device, poison=POISON_OUTPUTS)


# "deterministic" (default) or "atomic": see the module docstring.
BACKWARD = os.environ.get("CONTRASTIVE_OPS_TRITON_BACKWARD", "deterministic")
_ATOMIC_MAX_D = 256  # the atomic kernels hold a BLOCK × next_pow2(D) fp32 accumulator

_FLAG_KEYS = ["HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL", "PREC"]


# ---------------------------------------------------------------------------
# Forward, general: grid (row tiles, column splits)
# ---------------------------------------------------------------------------
@autotune(configs(("BLOCK_N",), FWD_N_GPU, INTERP_N), key=["D", "B_LOG2", "M_LOG2", "BLOCK_M"] + _FLAG_KEYS)
@triton.jit
def _fwd_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowPart, ColPart,
    B, M, D, stride_q, stride_k, cols_per_split, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    s0 = pid_s * cols_per_split  # a multiple of every BLOCK_N
    s1 = tl.minimum(s0 + cols_per_split, M)
    a = tl.maximum(lo, s0)  # tile-aligned
    b = tl.minimum(hi, s1)
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_CHUNK:  # the Q tile is loaded once
        q_tile = load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    else:
        q_tile = 0
    col_out = ColPart + pid_m.to(tl.int64) * M
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n_tiles = tl.cdiv(tl.maximum(b - a, 0), BLOCK_N)
    for i in range(0, n_tiles):
        cols, col_mask, k_rows = col_tile(a + i * BLOCK_N, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        if ONE_CHUNK:
            k_tile = load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
        else:
            k_tile = 0
        s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                       BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        s = scaled_s(s_raw, scale, ok)
        m_i, l_i = online_rows(s, m_i, l_i)
        if WANT_COL:
            tl.store(col_out + cols, col_lse(s), mask=col_mask)
    tl.store(RowPart + pid_s.to(tl.int64) * B + rows, lse_of(m_i, l_i), mask=row_mask)
    if WANT_COL:  # the split's columns no row of this tile may reach: partial −inf
        offs_n = tl.arange(0, BLOCK_N)
        neg = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        end = tl.minimum(a, s1)
        for n0 in range(s0, end, BLOCK_N):
            tl.store(col_out + n0 + offs_n, neg, mask=n0 + offs_n < end)
        t_end = a + n_tiles * BLOCK_N
        for n0 in range(t_end, s1, BLOCK_N):
            tl.store(col_out + n0 + offs_n, neg, mask=n0 + offs_n < s1)


def fwd_plan(B: int, M: int, device: torch.device) -> Tuple[int, int, int]:
    """``(BLOCK_M, n_split, cols_per_split)`` of the general forward, from the shape.

    128-row tiles while they fill the SMs, else 64; then, while the row tiles
    are fewer than about two per SM, the columns are split into chunks of at
    least ``min_cols`` (a multiple of every BLOCK_N) so the grid fills the GPU.
    """
    sms = sm_count(device)
    if interpreting():
        block_m, align, min_cols = INTERP_BLOCK[0], INTERP_N[0], INTERP_N[0]
    else:
        block_m = 128 if triton.cdiv(B, 128) >= sms else 64
        align, min_cols = 128, 1024
    t_b = triton.cdiv(B, block_m)
    want = max(1, triton.cdiv(2 * sms, max(t_b, 1)))
    n_split = max(1, min(want, M // min_cols))
    cps = triton.cdiv(triton.cdiv(max(M, 1), n_split), align) * align
    return block_m, triton.cdiv(max(M, 1), cps), cps


# ---------------------------------------------------------------------------
# Forward, Gram: program p owns row tiles p and T−1−p, each over J ≥ I
# ---------------------------------------------------------------------------
@autotune(configs((), SYM_FWD_GPU, ()), key=["D", "B_LOG2", "BLOCK", "N_EXCLUDE", "PREC"])
@triton.jit
def _gram_fwd_kernel(
    Z, Scale, Exclude, Part, B, D, stride_z, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = tl.load(Scale)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    T = tl.cdiv(B, BLOCK)
    neg = tl.full((BLOCK,), float("-inf"), tl.float32)
    n_own = 2 - (2 * pid + 1 == T).to(tl.int32)
    for r in range(0, n_own):
        ti = pid + r * (T - 1 - 2 * pid)
        rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = row_tile(
            ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        part = Part + ti.to(tl.int64) * B
        for n0 in range(0, ti * BLOCK, BLOCK):  # entries before the diagonal live in other rows of Part
            tl.store(part + n0 + offs, neg)
        if ONE_CHUNK:
            zi = load_tile(Z, z_rows_i, mask_i, offs_d, D, stride_z, UPCAST)
            # a second copy as the right operand: the interpreter's numpy computes Z·Zᵀ of one
            # array with a symmetric product that rounds differently from the other tiles' products
            zd = load_tile(Z, z_rows_i, mask_i, offs_d, D, stride_z, UPCAST)
        else:
            zi = 0
            zd = 0
        # the diagonal tile: rows I take b ≥ a, the mirrored a < b go to the column part
        s_raw = s_tile(Z, Z, z_rows_i, z_rows_i, mask_i, mask_i, D, stride_z, stride_z, zi, zd,
                       BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        upper = rows_i[:, None] <= rows_i[None, :]
        ok_r = allowed(rows_i, mask_i, mask_i, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
        ok_c = allowed_t(rows_i, mask_i, mask_i, e0_i, e1_i, N_EXCLUDE)
        m_i, l_i = online_rows(scaled_s(s_raw, scale, ok_r & upper),
                               tl.full((BLOCK,), float("-inf"), tl.float32), tl.zeros((BLOCK,), tl.float32))
        diag_col = col_lse(scaled_s(s_raw, scale, ok_c & (rows_i[:, None] < rows_i[None, :])))
        for tj in range(ti + 1, T):
            rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = row_tile(
                tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
            if ONE_CHUNK:
                zj = load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
            else:
                zj = 0
            s_raw = s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z, zi, zj,
                           BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
            ok_r = allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
            m_i, l_i = online_rows(scaled_s(s_raw, scale, ok_r), m_i, l_i)
            ok_c = allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
            tl.store(part + rows_j, col_lse(scaled_s(s_raw, scale, ok_c)), mask=mask_j)
        tl.store(part + rows_i, logaddexp(lse_of(m_i, l_i), diag_col), mask=mask_i)


def gram_block(B: int, device: torch.device) -> int:
    """Square tile of the Gram forward: 64 on the GPU (128 spills: two masked 128×128 fp32 copies of
    S live at once, 136–1,184 B per thread on sm_90a)."""
    return INTERP_SYM[0] if interpreting() else 64


# ---------------------------------------------------------------------------
# Backward, general (deterministic): dq (row-stationary) and dk (column-stationary)
# ---------------------------------------------------------------------------
@triton.jit
def _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL: tl.constexpr):
    """dS of a tile from the recomputed S and the saved LSEs (an LSE of −inf counts as +inf: P = 0)."""
    s = scaled_s(s_raw, scale, ok)
    lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
    ds = g_r[:, None] * tl.exp(s - lse_r[:, None])
    if WANT_COL:
        lse_c = tl.load(ColLse + cols, mask=col_mask, other=float("-inf"))
        lse_c = tl.where(lse_c == float("-inf"), float("inf"), lse_c)
        g_c = tl.load(GradCol + cols, mask=col_mask, other=0.0)
        ds += g_c[None, :] * tl.exp(s - lse_c[None, :])
    return tl.where(ok, ds, 0.0)


@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)
@triton.jit
def _bwd_dq_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DQ, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row-stationary: program (row tile, output chunk) streams the column tiles; S once per tile.

    ``REUSE`` (one S chunk that is also the whole output width): the K tile
    that built S is the operand of dS·K; otherwise the BLOCK_DO-wide K tile is
    loaded beside it.  dscale: one partial per row tile (chunk-0 programs).
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if ONE_CHUNK:
        q_tile = load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    else:
        q_tile = 0
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        if ONE_CHUNK:
            k_tile = load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
        else:
            k_tile = 0
        s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                       BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        if REUSE:
            kt = k_tile
        else:
            kt = load_tile(K, k_rows, col_mask, offs_o, D, stride_k, UPCAST)
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DQ + q_rows[:, None] * stride_dq + offs_o[None, :], acc.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & (offs_o < D)[None, :])
    if pid_d == 0:
        tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


@triton.jit
def _dk_step(acc, Q, K, k_tile, t, B, M, D, cols, col_mask, k_rows, offs_d, offs_o, scale,
             RowIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol, stride_q, stride_k,
             HAS_ROW_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr,
             UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
             REUSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_T: tl.constexpr):
    """acc += dS_tᵀ · Q_t[:, offs_o] for row tile t against the held column tile (``DK_T``: the
    transposed accumulator, accᵀ += Q_t[:, offs_o]ᵀ · dS_t, D as the product's M dimension)."""
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    if ONE_CHUNK:
        q_tile = load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    else:
        q_tile = 0
    s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                   BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
    if REUSE:
        qt = q_tile
    else:
        qt = load_tile(Q, q_rows, row_mask, offs_o, D, stride_q, UPCAST)
    if DK_T:
        out = tl.dot(tl.trans(qt), ds.to(qt.dtype), acc, input_precision=PREC)
    else:
        out = tl.dot(tl.trans(ds.to(qt.dtype)), qt, acc, input_precision=PREC)
    return out


@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)
@triton.jit
def _bwd_dk_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DK,
    B, M, D, stride_q, stride_k, stride_dk, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    DK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column-stationary: program (column tile, output chunk) holds its K tile and a BLOCK_N × BLOCK_DO
    dK accumulator and streams the row tiles; S (as Q·Kᵀ) once per tile.  With ranges, row tiles
    whose columns miss this tile are skipped (the only runtime branch, under ``HAS_RANGE``)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    n0 = pid_n * BLOCK_N
    cols, col_mask, k_rows = col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if ONE_CHUNK:
        k_tile = load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
    else:
        k_tile = 0
    if DK_T:  # dKᵀ: BLOCK_DO (up to 1024) is the product's M dimension, BLOCK_N (32) its N
        acc = tl.zeros((BLOCK_DO, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for t in range(0, tl.cdiv(B, BLOCK_M)):
        if HAS_RANGE:
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < B
            cs = tl.load(ColStart + rows, mask=row_mask, other=0)
            ce = tl.load(ColEnd + rows, mask=row_mask, other=0)
            lo, hi = col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
            if (lo < n0 + BLOCK_N) & (hi > n0):
                acc = _dk_step(acc, Q, K, k_tile, t, B, M, D, cols, col_mask, k_rows, offs_d, offs_o, scale,
                               RowIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol, stride_q,
                               stride_k, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC, BLOCK_D,
                               ONE_CHUNK, REUSE, BLOCK_M, BLOCK_N, DK_T)
        else:
            acc = _dk_step(acc, Q, K, k_tile, t, B, M, D, cols, col_mask, k_rows, offs_d, offs_o, scale,
                           RowIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol, stride_q,
                           stride_k, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC, BLOCK_D,
                           ONE_CHUNK, REUSE, BLOCK_M, BLOCK_N, DK_T)
    acc = acc * scale
    if DK_T:
        tl.store(DK + k_rows[None, :] * stride_dk + offs_o[:, None], acc.to(DK.dtype.element_ty),
                 mask=col_mask[None, :] & (offs_o < D)[:, None])
    else:
        tl.store(DK + k_rows[:, None] * stride_dk + offs_o[None, :], acc.to(DK.dtype.element_ty),
                 mask=col_mask[:, None] & (offs_o < D)[None, :])


# The same kernel with the transposed dK accumulator (``DK_T``), for 16-bit D wider than one
# output chunk of the dq kernel: D = 768 and 1024 in one chunk, S once (4 units instead of 6).
_bwd_dk_wide_kernel = autotune(configs(("BLOCK_M", "BLOCK_N"), DK_WIDE_GPU, INTERP_BLOCK),
                               key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)(_bwd_dk_kernel.fn)


def dk_wide(D: int, dtype: torch.dtype) -> bool:
    """Whether the dk kernel takes the transposed accumulator over all of D: 16-bit inputs (fp32's
    tf32x3 has no transposed operand on wgmma) whose D needs several dq chunks, up to 1024."""
    n_d = triton.cdiv(D, block_do(D, dtype))
    return n_d > 1 and d_pad(D) <= DK_WIDE_MAX_D and dtype != torch.float32


# ---------------------------------------------------------------------------
# Backward, general, atomic (opt-in, D ≤ 256, not deterministic)
# ---------------------------------------------------------------------------
# One row-stationary program per row tile holds the padded width BLOCK_DP of
# Q and K tiles, builds S once (the forward's chunks), keeps dQ in registers
# and adds dK_J += scale·dS_IJᵀ·Q_I with fp32 atomics into DKAcc: 6 units.
# A deterministic version would need one (M, D) fp32 buffer per concurrent
# program, so the order of the atomic adds (run to run) is the price.
@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_ATOMIC_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS,
          reset_to_zero=["DKAcc"])
@triton.jit
def _bwd_atomic_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DQ, DKAcc, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq, stride_acc, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    offs_d = tl.arange(0, BLOCK_DP)
    d_mask = offs_d < D
    q_tile = load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    acc = tl.zeros((BLOCK_M, BLOCK_DP), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        k_tile = load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
        # ONE_CHUNK: BLOCK_DP == BLOCK_D, the held tiles are the forward's chunk
        s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                       BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        ds_lo = ds.to(k_tile.dtype)
        acc = tl.dot(ds_lo, k_tile, acc, input_precision=PREC)
        dk = tl.dot(tl.trans(ds_lo), q_tile, input_precision=PREC) * scale
        tl.atomic_add(DKAcc + k_rows[:, None] * stride_acc + offs_d[None, :], dk,
                      mask=col_mask[:, None] & d_mask[None, :])
    acc = acc * scale
    tl.store(DQ + q_rows[:, None] * stride_dq + offs_d[None, :], acc.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


# ---------------------------------------------------------------------------
# Backward, Gram
# ---------------------------------------------------------------------------
# With only row LSEs, dS_ij = g_i·exp(S_ij − lse_i) on pairs allowed for row i,
# and the gradient of the one tensor Z is dZ = scale·(dS + dSᵀ)·Z, i.e.
# dZ_I = scale·Σ_J A_IJ·Z_J with A_IJ = dS_IJ + (dS_JI)ᵀ, both read off the one
# tile the forward used for the pair (I, J): Z_I·Z_Jᵀ for I ≤ J, Z_J·Z_Iᵀ
# (used transposed) for J < I; on the diagonal tile the lower triangle is the
# transposed upper one.  TERMS: 3 the whole A (q is k); 1 only dS_IJ (dq of a
# key that holds the same values but is another tensor, e.g. z.detach());
# 2 only (dS_JI)ᵀ (its dk).


@triton.jit
def _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j):
    """dS_IJ and (dS_JI)ᵀ, both laid out like the tile S_IJ (rows I, columns J)."""
    lse_i = tl.where(lse_i == float("-inf"), float("inf"), lse_i)
    lse_j = tl.where(lse_j == float("-inf"), float("inf"), lse_j)
    ds = tl.where(ok, g_i[:, None] * tl.exp(scaled_s(s_raw, scale, ok) - lse_i[:, None]), 0.0)
    ds_t = tl.where(ok_t, g_j[None, :] * tl.exp(scaled_s(s_raw, scale, ok_t) - lse_j[None, :]), 0.0)
    return ds, ds_t


@triton.jit
def _gram_pick(ds, ds_t, TERMS: tl.constexpr):
    if TERMS == 3:
        a = ds + ds_t
    elif TERMS == 1:
        a = ds
    else:
        a = ds_t
    return a


@triton.jit
def _gram_j_tile(tj, B, Exclude, RowLse, GradRow, Z, offs_d, offs_o, D, stride_z,
                 N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Rows, exclusions, saved statistics and tiles of column tile J."""
    rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = row_tile(
        tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    lse_j = tl.load(RowLse + rows_j, mask=mask_j, other=float("-inf"))
    g_j = tl.load(GradRow + rows_j, mask=mask_j, other=0.0)
    if ONE_CHUNK:
        zj = load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
    else:
        zj = 0
    if REUSE:
        zo = zj
    else:
        zo = load_tile(Z, z_rows_j, mask_j, offs_o, D, stride_z, UPCAST)
    return rows_j, mask_j, z_rows_j, e0_j, e1_j, lse_j, g_j, zj, zo


@autotune(configs(("BLOCK",), SYM_BWD_GPU, INTERP_SYM), key=["D", "B_LOG2", "N_EXCLUDE", "TERMS", "PREC"])
@triton.jit
def _gram_bwd_kernel(
    Z, Scale, Exclude, RowLse, GradRow, DZ, DscalePart,
    B, D, stride_z, stride_dz, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    TERMS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row-stationary over all column tiles J in three loops (J < I, J = I, J > I); one program per
    (row tile, output chunk) holds dZ_I in registers and writes it once: 4 units for one chunk."""
    ti = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    T = tl.cdiv(B, BLOCK)
    rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = row_tile(
        ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    lse_i = tl.load(RowLse + rows_i, mask=mask_i, other=float("-inf"))
    g_i = tl.load(GradRow + rows_i, mask=mask_i, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if ONE_CHUNK:
        zi = load_tile(Z, z_rows_i, mask_i, offs_d, D, stride_z, UPCAST)
    else:
        zi = 0
    acc = tl.zeros((BLOCK, BLOCK_DO), tl.float32)
    dscale_t = tl.zeros((BLOCK,), tl.float32)  # this loop's row sums come out along the tile's columns
    # J < I: the forward's tile Z_J·Z_Iᵀ (rows J); every quantity below is laid out (J, I)
    for tj in range(0, ti):
        rows_j, mask_j, z_rows_j, e0_j, e1_j, lse_j, g_j, zj, zo = _gram_j_tile(
            tj, B, Exclude, RowLse, GradRow, Z, offs_d, offs_o, D, stride_z, N_EXCLUDE, UPCAST, ONE_CHUNK, REUSE,
            BLOCK)
        s_raw = s_tile(Z, Z, z_rows_j, z_rows_i, mask_j, mask_i, D, stride_z, stride_z, zj, zi,
                       BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(rows_i, mask_j, mask_i, cs, ce, e0_j, e1_j, False, N_EXCLUDE)
        ok_t = allowed_t(rows_j, mask_j, mask_i, e0_i, e1_i, N_EXCLUDE)
        ds_j, ds_it = _gram_ds(s_raw, scale, ok, ok_t, lse_j, g_j, lse_i, g_i)  # dS_JI, (dS_IJ)ᵀ
        dscale_t += tl.sum(ds_it * s_raw, 0)
        a_t = _gram_pick(ds_it, ds_j, TERMS)
        acc = tl.dot(tl.trans(a_t.to(zo.dtype)), zo, acc, input_precision=PREC)
    # J = I: the lower triangle is the transposed upper one
    rows_j, mask_j, z_rows_j, e0_j, e1_j, lse_j, g_j, zj, zo = _gram_j_tile(
        ti, B, Exclude, RowLse, GradRow, Z, offs_d, offs_o, D, stride_z, N_EXCLUDE, UPCAST, ONE_CHUNK, REUSE, BLOCK)
    s_raw = s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z, zi, zj,
                   BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    s_raw = tl.where(rows_i[:, None] <= rows_j[None, :], s_raw, tl.trans(s_raw))
    ok = allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
    ok_t = allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
    ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
    dscale = dscale_t + tl.sum(ds * s_raw, 1)
    acc = tl.dot(_gram_pick(ds, ds_t, TERMS).to(zo.dtype), zo, acc, input_precision=PREC)
    # J > I: the forward's tile Z_I·Z_Jᵀ
    for tj in range(ti + 1, T):
        rows_j, mask_j, z_rows_j, e0_j, e1_j, lse_j, g_j, zj, zo = _gram_j_tile(
            tj, B, Exclude, RowLse, GradRow, Z, offs_d, offs_o, D, stride_z, N_EXCLUDE, UPCAST, ONE_CHUNK, REUSE,
            BLOCK)
        s_raw = s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z, zi, zj,
                       BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
        ok_t = allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
        ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
        dscale += tl.sum(ds * s_raw, 1)
        acc = tl.dot(_gram_pick(ds, ds_t, TERMS).to(zo.dtype), zo, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DZ + z_rows_i[:, None] * stride_dz + offs_o[None, :], acc.to(DZ.dtype.element_ty),
             mask=mask_i[:, None] & (offs_o < D)[None, :])
    if pid_d == 0:
        tl.store(DscalePart + ti, tl.sum(dscale, 0))


@triton.jit
def _pair_range(pid, nprog, T):
    """Share of program ``pid`` of the T·(T+1)/2 tile pairs I ≤ J (row-major over the upper
    triangle, equal contiguous runs).  Returns p0, p1 and the first pair (I, J)."""
    total = T * (T + 1) // 2
    per = tl.cdiv(total, nprog)
    p0 = tl.minimum(pid * per, total)
    p1 = tl.minimum(p0 + per, total)
    ti = pid * 0
    while (ti < T - 1) & ((ti + 1) * T - ((ti + 1) * ti) // 2 <= p0):
        ti += 1
    tj = ti + p0 - (ti * T - (ti * (ti - 1)) // 2)
    return p0, p1, ti, tj


# Atomic Gram backward (opt-in, D ≤ 256): each pair I ≤ J once, S_IJ built once
# as the forward builds it, dZ_I += A_IJ·Z_J in registers (flushed with one
# atomic add when leaving I), dZ_J += A_IJᵀ·Z_I (J > I) with fp32 atomics: 3 units.
@autotune(configs(("BLOCK",), SYM_ATOMIC_GPU, INTERP_SYM), key=["D", "B_LOG2", "N_EXCLUDE", "PREC"],
          reset_to_zero=["DZAcc"])
@triton.jit
def _gram_bwd_atomic_kernel(
    Z, Scale, Exclude, RowLse, GradRow, DZAcc, DscalePart,
    B, D, stride_z, stride_acc, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(Scale)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_DP)
    d_mask = offs_d < D
    T = tl.cdiv(B, BLOCK)
    p0, p1, ti, tj = _pair_range(pid, nprog, T)
    zi = load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z, UPCAST)
    acc = tl.zeros((BLOCK, BLOCK_DP), tl.float32)
    dscale = tl.zeros((BLOCK,), tl.float32)
    for p in range(p0, p1):
        rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = row_tile(
            ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = row_tile(
            tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        zj = load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
        s_raw = s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z, zi, zj,
                       BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        if tj == ti:
            s_raw = tl.where(rows_i[:, None] <= rows_j[None, :], s_raw, tl.trans(s_raw))
        ok = allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
        ok_t = allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
        lse_i = tl.load(RowLse + rows_i, mask=mask_i, other=float("-inf"))
        g_i = tl.load(GradRow + rows_i, mask=mask_i, other=0.0)
        lse_j = tl.load(RowLse + rows_j, mask=mask_j, other=float("-inf"))
        g_j = tl.load(GradRow + rows_j, mask=mask_j, other=0.0)
        ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
        a = ds + ds_t
        dscale += tl.sum(tl.where(tj == ti, ds, a) * s_raw, 1)
        a_lo = a.to(zj.dtype)
        acc = tl.dot(a_lo, zj, acc, input_precision=PREC)
        if tj > ti:
            dzj = tl.dot(tl.trans(a_lo), zi, input_precision=PREC) * scale
            tl.atomic_add(DZAcc + z_rows_j[:, None] * stride_acc + offs_d[None, :], dzj,
                          mask=mask_j[:, None] & d_mask[None, :])
        if (tj == T - 1) | (p == p1 - 1):  # leaving row tile I
            tl.atomic_add(DZAcc + z_rows_i[:, None] * stride_acc + offs_d[None, :], acc * scale,
                          mask=mask_i[:, None] & d_mask[None, :])
            acc = tl.zeros((BLOCK, BLOCK_DP), tl.float32)
        tj += 1
        if tj == T:
            ti += 1
            tj = ti
            zi = load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z,
                           UPCAST)
    tl.store(DscalePart + pid, tl.sum(dscale, 0))


def _pair_slots(device: torch.device, B: int) -> int:
    t = triton.cdiv(B, min_block())
    cap = 3 if device.type != "cuda" else 2 * sm_count(device)
    return max(1, min(cap, t * (t + 1) // 2))


# ---------------------------------------------------------------------------
# Custom ops and launchers
# ---------------------------------------------------------------------------


def _flags(q, row_index, col_index, col_start, col_end, exclude, want_col) -> dict:
    return dict(
        HAS_ROW_INDEX=row_index is not None,
        HAS_COL_INDEX=col_index is not None,
        HAS_RANGE=col_start is not None or col_end is not None,
        N_EXCLUDE=0 if exclude is None else int(exclude.shape[1]),
        WANT_COL=bool(want_col),
        **dot_flags(q.dtype),
    )


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


def _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) -> bool:
    """The Gram kernels cover q is k with no index lists, no ranges and no column LSE."""
    return (bool(gram) and row_index is None and col_index is None and col_start is None
            and col_end is None and not want_col and q.shape == k.shape)


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


def backward_path(D: int) -> str:
    """``"atomic"`` or ``"deterministic"``: which backward the launcher takes (module docstring)."""
    if BACKWARD not in ("deterministic", "atomic"):
        raise ValueError(f"contrastive_ops triton BACKWARD must be 'deterministic' or 'atomic', got {BACKWARD!r}")
    if BACKWARD == "atomic" and D <= _ATOMIC_MAX_D and not torch.are_deterministic_algorithms_enabled():
        return "atomic"
    return "deterministic"


@torch.library.triton_op("contrastive_ops_triton::sim_lse_fwd", mutates_args=())
def _sim_lse_fwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    want_col: bool, gram: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``gram=True`` promises that ``k`` holds the same values as ``q`` (Gram kernel when it applies)."""
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    bd = chunk_d(D, q.dtype)
    if _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) and B > 0:
        block = gram_block(B, q.device)
        T = triton.cdiv(B, block)
        part = _empty((T, B), torch.float32, q.device)  # every entry written once
        launch("gram_fwd", _gram_fwd_kernel, (triton.cdiv(T, 2),))(
            q, scale, _ptr(exclude, scale), part, B, D, q.stride(0), log2_bucket(B),
            N_EXCLUDE=flags["N_EXCLUDE"], UPCAST=flags["UPCAST"], PREC=flags["PREC"],
            BLOCK_D=bd, ONE_CHUNK=D <= bd, BLOCK=block,
        )
        return torch.logsumexp(part, 0), torch.empty((0,), dtype=torch.float32, device=q.device)
    if B == 0:
        col_lse = torch.full((M if want_col else 0,), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.empty((0,), dtype=torch.float32, device=q.device), col_lse
    block_m, n_split, cps = fwd_plan(B, M, q.device)
    t_b = triton.cdiv(B, block_m)
    row_part = _empty((n_split, B), torch.float32, q.device)
    col_part = _empty((t_b if want_col else 0, M), torch.float32, q.device)  # every entry written once
    launch("fwd", _fwd_kernel, (t_b, n_split))(
        q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
        _ptr(col_end, scale), _ptr(exclude, scale), row_part, _ptr(col_part if want_col else None, row_part),
        B, M, D, q.stride(0), k.stride(0), cps, log2_bucket(B), log2_bucket(M),
        BLOCK_D=bd, ONE_CHUNK=D <= bd, BLOCK_M=block_m, **flags,
    )
    row_lse = row_part[0] if n_split == 1 else torch.logsumexp(row_part, 0)
    if want_col:
        col_lse = torch.logsumexp(col_part, 0)
    else:
        col_lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return row_lse, col_lse


@_sim_lse_fwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, gram=False):
    B, M, _ = _sizes(q, k, row_index, col_index)
    return q.new_empty((B,), dtype=torch.float32), q.new_empty((M if want_col else 0,), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sim_lse_bwd", mutates_args=())
def _sim_lse_bwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
    gram: bool = False, atomic: bool = False, same: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``gram=True`` promises that q *is* k for autograd: where the Gram kernel applies, the whole
    gradient of that one tensor is returned in dq and dk is zero.  ``same=True`` promises only that
    k holds q's values (the forward took the Gram kernel): where it applies, dq and dk come from
    the Gram kernel's separate terms, so the backward reads the forward's S.  ``atomic=True`` takes
    the single-recompute kernels (non-deterministic; D ≤ 256, else ignored)."""
    want_col = col_lse.numel() > 0
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    launch_any = B > 0 and M > 0
    atomic = bool(atomic) and D <= _ATOMIC_MAX_D
    bd, bdo, gram_bdo = chunk_d(D, q.dtype), block_do(D, q.dtype), block_do(D, q.dtype, gram=True)
    one_chunk = D <= bd
    n_d, gram_n_d = triton.cdiv(D, bdo), triton.cdiv(D, gram_bdo)
    reuse = one_chunk and n_d == 1 and bdo == bd
    dot_kw = dict(UPCAST=flags["UPCAST"], PREC=flags["PREC"])
    gram_kw = dict(N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=bd, BLOCK_DO=gram_bdo, ONE_CHUNK=one_chunk,
                   REUSE=one_chunk and gram_n_d == 1 and gram_bdo == bd, **dot_kw)
    n_parts = triton.cdiv(B, min_block())

    def gram_rows(terms: int, name: str, dscale_part: Tensor) -> Tensor:
        out = _empty(q.shape, q.dtype, q.device)
        launch(name, _gram_bwd_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK"]), gram_n_d))(
            q, scale, _ptr(exclude, scale), row_lse, grad_row, out, dscale_part,
            B, D, q.stride(0), out.stride(0), log2_bucket(B), TERMS=terms, **gram_kw,
        )
        return out

    if not gram and same and _gram_applies(True, q, k, row_index, col_index, col_start, col_end, want_col):
        # k holds q's values but is another tensor for autograd (e.g. z.detach()): dq = scale·dS·K
        # and dk = scale·dSᵀ·Q from the Gram kernel's two terms (the forward's S, read the same way).
        if not launch_any:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros((), dtype=torch.float32, device=q.device)
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
                q, scale, _ptr(exclude, scale), row_lse, grad_row, dz_acc, dscale_part,
                B, D, q.stride(0), dz_acc.stride(0), log2_bucket(B),
                N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=bd, ONE_CHUNK=one_chunk, BLOCK_DP=d_pad(D), **dot_kw,
            )
            return dz_acc.to(q.dtype), dk, dscale_part.sum()
        dscale_part = torch.zeros((n_parts,), dtype=torch.float32, device=q.device)
        dz = gram_rows(3, "gram_bwd", dscale_part)
        return dz, dk, dscale_part.sum()

    # Rows outside an index list get no gradient: those outputs start at zero.
    dq = _empty(q.shape, q.dtype, q.device) if row_index is None and launch_any else torch.zeros_like(q)
    dscale_part = torch.zeros((n_parts,), dtype=torch.float32, device=q.device)
    common = (q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
              _ptr(col_end, scale), _ptr(exclude, scale), row_lse, _ptr(col_lse if want_col else None, row_lse),
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
      gram=False, atomic=False, same=False):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def sim_lse_forward(q, k, scale, row_index=None, col_index=None, col_start=None, col_end=None,
                    exclude=None, want_col=False, *, gram: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Row (B,) and column (M,) LSEs in fp32; the column one is 0-element unless ``want_col``.

    ``gram``: None detects it (``same_values(q, k)``); the Gram kernel runs when
    it is true and there are no index lists, no ranges and no column LSE.
    """
    if gram is None:
        gram = same_values(q, k)
    return torch.ops.contrastive_ops_triton.sim_lse_fwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col), bool(gram))


def sim_lse_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                     row_lse, col_lse, grad_row, grad_col, *, gram: Optional[bool] = None,
                     atomic: Optional[bool] = None, same: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
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
        atomic = backward_path(q.shape[1]) == "atomic"
    return torch.ops.contrastive_ops_triton.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, grad_row.float().contiguous(), grad_col.float().contiguous(), bool(gram), bool(atomic),
        bool(gram or same))


class _SimLSEPrimitive:
    """The ``"sim_lse"`` primitive of the Triton backend (see ``contrastive_ops.core``)."""

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
        gram = same_values(q, k)
        return sim_lse_forward(q.contiguous(), k.contiguous(), scale.float().reshape(()), row_index,
                               col_index, col_start, col_end, exclude, want_col, gram=gram)

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col):
        gram = q is k  # one tensor for autograd: dq + dk is what it receives
        same = same_values(q, k)  # the forward's test: it took the Gram kernel
        dq, dk, dscale = sim_lse_backward(q.contiguous(), k.contiguous(), scale.float().reshape(()),
                                          row_index, col_index, col_start, col_end, exclude,
                                          row_lse, col_lse, grad_row, grad_col, gram=gram, same=same)
        return dq, dk, dscale.to(scale.dtype)


SIM_LSE = _SimLSEPrimitive()


# ---------------------------------------------------------------------------
# Compile specifications: every (kernel, config) the dispatcher can pick on sm_90a
# ---------------------------------------------------------------------------


def compile_specs() -> List[dict]:
    """One entry per (kernel, config, dtype, D) the GPU dispatcher can pick, for D in
    ``tiles.SPEC_DS`` and bf16/fp16/fp32, with the CLIP flags (no index lists, no
    ranges, no exclusions, column LSE) for the general kernels and one exclusion
    for the Gram kernels (NT-Xent).  The atomic kernels (opt-in) are not listed."""
    out = []
    gen = dict(HAS_ROW_INDEX=False, HAS_COL_INDEX=False, HAS_RANGE=False, N_EXCLUDE=0, WANT_COL=True)
    for dname in SPEC_DTYPES:
        flags = gpu_dot_flags(dname)
        for D in SPEC_DS:
            bd, bdo = gpu_chunk_d(D, dname), gpu_block_do(D, dname)
            one = D <= bd
            n_d = triton.cdiv(D, bdo)
            reuse = one and n_d == 1 and bdo == bd
            elem = 4 if dname == "fp32" else 2
            for block_m in (128, 64):
                for (bn,), w, st in FWD_N_GPU:
                    c = dict(gen, **flags, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_M=block_m, BLOCK_N=bn)
                    if fwd_smem(block_m, bn, bd, st, elem) > SMEM_LIMIT:
                        continue
                    out.append(spec("sim_lse_fwd", _fwd_kernel.fn, dname, D, c, w, st))
            for block in (64,):
                for _, w, st in SYM_FWD_GPU:
                    c = dict(N_EXCLUDE=1, **flags, BLOCK_D=bd, ONE_CHUNK=one, BLOCK=block)
                    if fwd_smem(block, block, bd, st, elem) > SMEM_LIMIT:
                        continue
                    out.append(spec("sim_lse_gram_fwd", _gram_fwd_kernel.fn, dname, D, c, w, st))
            bwd = dict(BLOCK_D=bd, BLOCK_DO=bdo, ONE_CHUNK=one, REUSE=reuse)
            wide = triton.cdiv(D, bdo) > 1 and D <= DK_WIDE_MAX_D and dname != "fp32"
            for (bm, bn), w, st in BWD_GPU:
                c = dict(gen, **flags, **bwd, BLOCK_M=bm, BLOCK_N=bn)
                if not acc_fits(c, w, bdo):
                    continue
                out.append(spec("sim_lse_bwd_dq", _bwd_dq_kernel.fn, dname, D, c, w, st))
                if not wide:
                    out.append(spec("sim_lse_bwd_dk", _bwd_dk_kernel.fn, dname, D, dict(c, DK_T=False), w, st))
            if wide:
                for (bm, bn), w, st in DK_WIDE_GPU:
                    c = dict(gen, **flags, BLOCK_D=bd, BLOCK_DO=triton.next_power_of_2(D), ONE_CHUNK=one,
                             REUSE=False, DK_T=True, BLOCK_M=bm, BLOCK_N=bn)
                    out.append(spec("sim_lse_bwd_dk_wide", _bwd_dk_kernel.fn, dname, D, c, w, st))
            gbdo = gpu_block_do(D, dname, gram=True)
            gram_bwd = dict(BLOCK_D=bd, BLOCK_DO=gbdo, ONE_CHUNK=one, REUSE=one and D <= gbdo and gbdo == bd)
            for (blk,), w, st in SYM_BWD_GPU:
                c = dict(N_EXCLUDE=1, **flags, **gram_bwd, TERMS=3, BLOCK=blk)
                if not acc_fits(c, w, gbdo):
                    continue
                out.append(spec("sim_lse_gram_bwd", _gram_bwd_kernel.fn, dname, D, c, w, st))
    return out
