r"""Backward kernels of the sim_lse primitive: dq / dk (deterministic), the atomic backward, the
Gram backwards (row-stationary and atomic), and the tile kernels of the GEMM backwards (dS, Gram G).

The maths, the paths and their costs are described in :mod:`.sim_lse` (which
launches these kernels and re-exports their names).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sim_lse_fwd import _FLAG_KEYS
from .tiles import (
    BWD_ATOMIC_GPU, BWD_DQ_GPU, BWD_GPU, DK_WIDE_GPU, DS_GPU, INTERP_BLOCK, INTERP_SYM, SYM_ATOMIC_GPU, SYM_BWD_GPU,
    allowed, allowed_t, autotune, col_bounds, col_tile, configs, fexp, held_tile, load_tile, row_max_of, row_span,
    row_tile, s_tile, scaled_s, under_row_max, under_row_max_t,
)


# ---------------------------------------------------------------------------
# Backward, general (deterministic): dq (row-stationary) and dk (column-stationary)
# ---------------------------------------------------------------------------
@triton.jit
def _row_stats(RowLse, GradRow, rows, mask):
    """The forward's LSE and the upstream gradient of rows ``rows`` (−inf and 0 outside ``mask``)."""
    return (tl.load(RowLse + rows, mask=mask, other=float("-inf")),
            tl.load(GradRow + rows, mask=mask, other=0.0))


@triton.jit
def _store_rows(Out, out_rows, mask, stride, offs_o, D, acc, scale):
    """Out[out_rows][:, offs_o] = scale·acc (rows outside ``mask`` and columns ≥ D not written)."""
    tl.store(Out + out_rows[:, None] * stride + offs_o[None, :], (acc * scale).to(Out.dtype.element_ty),
             mask=mask[:, None] & (offs_o < D)[None, :])


@triton.jit
def _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL: tl.constexpr):
    """dS of a tile from the recomputed S and the saved LSEs (an LSE of −inf counts as +inf: P = 0)."""
    lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
    if WANT_COL:
        lse_c = tl.load(ColLse + cols, mask=col_mask, other=float("inf"))
        lse_c = tl.where(lse_c == float("-inf"), float("inf"), lse_c)
        g_c = tl.load(GradCol + cols, mask=col_mask, other=0.0)
    else:
        lse_c = 0.0
        g_c = 0.0
    return _p_tile(s_raw, scale, ok, lse_r, g_r, lse_c, g_c, WANT_COL)


@triton.jit
def _p_tile(s_raw, scale, ok, lse_r, g_r, lse_c, g_c, WANT_COL: tl.constexpr):
    """dS = g_r·P_row (+ g_c·P_col) of a tile, from LSEs in which −inf is already +inf."""
    s = scaled_s(s_raw, scale, ok)
    ds = g_r[:, None] * fexp(s - lse_r[:, None])
    if WANT_COL:
        ds += g_c[None, :] * fexp(s - lse_c[None, :])
    return tl.where(ok, ds, 0.0)


@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_DQ_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)
@triton.jit
def _bwd_dq_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol,
    DQ, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
):
    """Row-stationary: program (row tile, output chunk) streams the column tiles; S once per tile.

    ``REUSE`` (one S chunk that is also the whole output width): the K tile
    that built S is the operand of dS·K; otherwise the BLOCK_DO-wide K tile is
    loaded beside it.  dscale: one partial per row tile (chunk-0 programs).
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1, lo, hi = row_span(
        pid_m, B, M, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, BLOCK_N, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lse_r, g_r = _row_stats(RowLse, GradRow, rows, row_mask)
    rmax = row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    q_tile = held_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST, ONE_CHUNK)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        k_tile = held_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST, ONE_CHUNK)
        s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                       BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ok = under_row_max(ok, s_raw, scale, rmax, HAS_ROW_MAX)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        if REUSE:
            kt = k_tile
        else:
            kt = load_tile(K, k_rows, col_mask, offs_o, D, stride_k, UPCAST)
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PREC)
    _store_rows(DQ, q_rows, row_mask, stride_dq, offs_o, D, acc, scale)
    if pid_d == 0:
        tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


@triton.jit
def _dk_step(acc, Q, K, k_tile, t, B, M, D, cols, col_mask, k_rows, offs_d, offs_o, scale,
             RowIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol, stride_q, stride_k,
             HAS_ROW_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr,
             UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
             REUSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_T: tl.constexpr,
             HAS_ROW_MAX: tl.constexpr):
    """acc += dS_tᵀ · Q_t[:, offs_o] for row tile t against the held column tile (``DK_T``: the
    transposed accumulator, accᵀ += Q_t[:, offs_o]ᵀ · dS_t, D as the product's M dimension)."""
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    q_tile = held_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST, ONE_CHUNK)
    s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                   BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
    ok = under_row_max(ok, s_raw, scale, row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX), HAS_ROW_MAX)
    lse_r, g_r = _row_stats(RowLse, GradRow, rows, row_mask)
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
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol,
    DK,
    B, M, D, stride_q, stride_k, stride_dk, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    DK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
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
    k_tile = held_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST, ONE_CHUNK)
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
                               RowIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol,
                               stride_q, stride_k, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC,
                               BLOCK_D, ONE_CHUNK, REUSE, BLOCK_M, BLOCK_N, DK_T, HAS_ROW_MAX)
        else:
            acc = _dk_step(acc, Q, K, k_tile, t, B, M, D, cols, col_mask, k_rows, offs_d, offs_o, scale,
                           RowIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol,
                           stride_q, stride_k, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC,
                           BLOCK_D, ONE_CHUNK, REUSE, BLOCK_M, BLOCK_N, DK_T, HAS_ROW_MAX)
    acc = acc * scale
    if DK_T:
        tl.store(DK + k_rows[None, :] * stride_dk + offs_o[:, None], acc.to(DK.dtype.element_ty),
                 mask=col_mask[None, :] & (offs_o < D)[:, None])
    else:
        tl.store(DK + k_rows[:, None] * stride_dk + offs_o[None, :], acc.to(DK.dtype.element_ty),
                 mask=col_mask[:, None] & (offs_o < D)[None, :])


# The same kernel with the transposed dK accumulator (``DK_T``), for 16-bit padded D of 512 and 1024:
# all of D in one chunk, S once (4 units; the plain kernel's 6 at D = 1024 and spills at 512).
_bwd_dk_wide_kernel = autotune(configs(("BLOCK_M", "BLOCK_N"), DK_WIDE_GPU, INTERP_BLOCK),
                               key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)(_bwd_dk_kernel.fn)


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
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol,
    DQ, DKAcc, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq, stride_acc, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1, lo, hi = row_span(
        pid_m, B, M, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, BLOCK_N, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lse_r, g_r = _row_stats(RowLse, GradRow, rows, row_mask)
    rmax = row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX)
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
        ok = under_row_max(ok, s_raw, scale, rmax, HAS_ROW_MAX)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        ds_lo = ds.to(k_tile.dtype)
        acc = tl.dot(ds_lo, k_tile, acc, input_precision=PREC)
        dk = tl.dot(tl.trans(ds_lo), q_tile, input_precision=PREC) * scale
        tl.atomic_add(DKAcc + k_rows[:, None] * stride_acc + offs_d[None, :], dk,
                      mask=col_mask[:, None] & d_mask[None, :])
    _store_rows(DQ, q_rows, row_mask, stride_dq, offs_d, D, acc, scale)
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
    ds = tl.where(ok, g_i[:, None] * fexp(scaled_s(s_raw, scale, ok) - lse_i[:, None]), 0.0)
    ds_t = tl.where(ok_t, g_j[None, :] * fexp(scaled_s(s_raw, scale, ok_t) - lse_j[None, :]), 0.0)
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
def _gram_oks(s_raw, scale, ok, ok_t, rmax_r, rmax_c, HAS_ROW_MAX: tl.constexpr):
    """``ok`` (the tile rows' view) and ``ok_t`` (the columns' view) under the row thresholds of the tile's
    rows ``rmax_r`` and of its columns ``rmax_c``, on the tile's own entries (as the Gram forward)."""
    return (under_row_max(ok, s_raw, scale, rmax_r, HAS_ROW_MAX),
            under_row_max_t(ok_t, s_raw, scale, rmax_c, HAS_ROW_MAX))


@triton.jit
def _gram_j_tile(tj, B, Exclude, RowLse, GradRow, Z, offs_d, offs_o, D, stride_z,
                 N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Rows, exclusions, saved statistics and tiles of column tile J."""
    rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = row_tile(
        tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    lse_j, g_j = _row_stats(RowLse, GradRow, rows_j, mask_j)
    zj = held_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST, ONE_CHUNK)
    if REUSE:
        zo = zj
    else:
        zo = load_tile(Z, z_rows_j, mask_j, offs_o, D, stride_z, UPCAST)
    return rows_j, mask_j, z_rows_j, e0_j, e1_j, lse_j, g_j, zj, zo


@autotune(configs(("BLOCK",), SYM_BWD_GPU, INTERP_SYM),
          key=["D", "B_LOG2", "N_EXCLUDE", "TERMS", "PREC", "HAS_ROW_MAX"])
@triton.jit
def _gram_bwd_kernel(
    Z, Scale, Exclude, RowMax, RowLse, GradRow, DZ, DscalePart,
    B, D, stride_z, stride_dz, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    TERMS: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
):
    """Row-stationary over all column tiles J in three loops (J < I, J = I, J > I); one program per
    (row tile, output chunk) holds dZ_I in registers and writes it once: 4 units for one chunk."""
    ti = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    T = tl.cdiv(B, BLOCK)
    rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = row_tile(
        ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    lse_i, g_i = _row_stats(RowLse, GradRow, rows_i, mask_i)
    rmax_i = row_max_of(RowMax, rows_i, mask_i, HAS_ROW_MAX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    zi = held_tile(Z, z_rows_i, mask_i, offs_d, D, stride_z, UPCAST, ONE_CHUNK)
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
        ok, ok_t = _gram_oks(s_raw, scale, ok, ok_t, row_max_of(RowMax, rows_j, mask_j, HAS_ROW_MAX), rmax_i,
                             HAS_ROW_MAX)
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
    ok, ok_t = _gram_oks(s_raw, scale, ok, ok_t, rmax_i, rmax_i, HAS_ROW_MAX)  # J = I: the same rows
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
        ok, ok_t = _gram_oks(s_raw, scale, ok, ok_t, rmax_i, row_max_of(RowMax, rows_j, mask_j, HAS_ROW_MAX),
                             HAS_ROW_MAX)
        ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
        dscale += tl.sum(ds * s_raw, 1)
        acc = tl.dot(_gram_pick(ds, ds_t, TERMS).to(zo.dtype), zo, acc, input_precision=PREC)
    _store_rows(DZ, z_rows_i, mask_i, stride_dz, offs_o, D, acc, scale)
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
@autotune(configs(("BLOCK",), SYM_ATOMIC_GPU, INTERP_SYM), key=["D", "B_LOG2", "N_EXCLUDE", "PREC", "HAS_ROW_MAX"],
          reset_to_zero=["DZAcc"])
@triton.jit
def _gram_bwd_atomic_kernel(
    Z, Scale, Exclude, RowMax, RowLse, GradRow, DZAcc, DscalePart,
    B, D, stride_z, stride_acc, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
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
        s_raw, ds, ds_t = _gram_pair_ds(s_raw, scale, tj == ti, rows_i, mask_i, e0_i, e1_i, rows_j, mask_j, e0_j,
                                        e1_j, cs, ce, RowMax, RowLse, GradRow, N_EXCLUDE, HAS_ROW_MAX)
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


# ---------------------------------------------------------------------------
# Backward, GEMM: dS of a block of rows to memory; the products dS·K and dSᵀ·Q are cuBLAS's
# ---------------------------------------------------------------------------
@autotune(configs(("BLOCK_M", "BLOCK_N"), DS_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2"] + _FLAG_KEYS)
@triton.jit
def _bwd_ds_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowMax, RowLse, ColLse, GradRow, GradCol, DS,
    B, M, D, stride_q, stride_k, stride_ds, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_MAX: tl.constexpr,
):
    """Program (row tile, column tile): S recomputed once and dS (unscaled, rounded to DS's dtype
    exactly as the dq/dk kernels round it before their products) stored.  dscale = Σ dS ⊙ (Q Kᵀ)
    is Σ Q ⊙ (dS·K), which the launcher takes from the product it does anyway.

    The statistics come as ``ds_stats`` makes them: −inf LSEs already +inf, and padded (LSE +inf,
    gradient 0) past B and M by at least one tile, so they are read without masks.  Without ranges,
    exclusions or thresholds no entry is masked either: a row past B or a column past M has P = 0
    and gradient 0 on its side, and its entries, whatever they are, are not stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    cols, col_mask, k_rows = col_tile(pid_n * BLOCK_N, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
    lse_r = tl.load(RowLse + rows)  # before the D loop: their latency goes under it
    g_r = tl.load(GradRow + rows)
    if WANT_COL:
        lse_c = tl.load(ColLse + cols)
        g_c = tl.load(GradCol + cols)
    else:
        lse_c = 0.0
        g_c = 0.0
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = held_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST, ONE_CHUNK)
    k_tile = held_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST, ONE_CHUNK)
    s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                   BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    if not HAS_RANGE and N_EXCLUDE == 0 and not HAS_ROW_MAX:
        ok = True
    else:
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ok = under_row_max(ok, s_raw, scale, row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX), HAS_ROW_MAX)
    ds = _p_tile(s_raw, scale, ok, lse_r, g_r, lse_c, g_c, WANT_COL)
    tl.store(DS + rows.to(tl.int64)[:, None] * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------
# GEMM backward of the Gram matrices: G = dS + dSᵀ by tiles, read as the Gram forward reads S
# ---------------------------------------------------------------------------

# Square tiles (the Gram forward's orientation rule needs I and J of one size) of 64, as the Gram
# forward's: at 128 × 128 the two views of the tile spill about 1.6 KB per thread on sm_90a.
GRAM_DS_GPU = [((64,), 4, 3), ((64,), 4, 4), ((64,), 8, 3)]


@autotune(configs(("BLOCK",), GRAM_DS_GPU, INTERP_SYM),
          key=["D", "B_LOG2", "N_EXCLUDE", "TERMS", "PREC", "HAS_ROW_MAX"])
@triton.jit
def _gram_ds_kernel(
    Z, Scale, Exclude, RowMax, RowLse, GradRow, G, DscalePart,
    R0, R1, B, D, stride_z, stride_g, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, TERMS: tl.constexpr, BLOCK: tl.constexpr,
    HAS_ROW_MAX: tl.constexpr,
):
    """Program (row tile I among the tiles of rows [R0, R1), column tile J): S read as the Gram
    forward reads it — the tile pair (L, H) = (min, max)(I, J) with L on the left, the diagonal
    tile's lower triangle transposed from its upper one — and G_IJ = dS_IJ + (dS_JI)ᵀ (``TERMS`` 3;
    1: dS_IJ; 2: (dS_JI)ᵀ) stored unscaled, rounded to G's dtype, at G[rows of I − R0, columns of J];
    DscalePart[program] gets Σ dS_IJ ⊙ S_IJ over the rows of I in [R0, R1) (no atomics).  No dot
    inside a branch: the layout (I, J) or (J, I) is chosen by ``where`` on the scalar I ≤ J."""
    ti = R0 // BLOCK + tl.program_id(0)
    tj = tl.program_id(1)
    scale = tl.load(Scale)
    lo = tl.minimum(ti, tj)
    hi = tl.maximum(ti, tj)
    rows_l, mask_l, z_rows_l, cs, ce, e0_l, e1_l = row_tile(
        lo, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    rows_h, mask_h, z_rows_h, cs, ce, e0_h, e1_h = row_tile(
        hi, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    offs_d = tl.arange(0, BLOCK_D)
    zl = held_tile(Z, z_rows_l, mask_l, offs_d, D, stride_z, UPCAST, ONE_CHUNK)
    zh = held_tile(Z, z_rows_h, mask_h, offs_d, D, stride_z, UPCAST, ONE_CHUNK)
    s_raw = s_tile(Z, Z, z_rows_l, z_rows_h, mask_l, mask_h, D, stride_z, stride_z, zl, zh,
                   BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    s_raw, ds, ds_t = _gram_pair_ds(s_raw, scale, lo == hi, rows_l, mask_l, e0_l, e1_l, rows_h, mask_h, e0_h, e1_h,
                                    cs, ce, RowMax, RowLse, GradRow, N_EXCLUDE, HAS_ROW_MAX)  # layout (L, H)
    first = ti <= tj  # I = L: G_IJ in the tile's layout; else I = H: G_IJ is the transpose
    if TERMS == 3:
        val = ds + ds_t  # symmetric in the two views
    else:
        val = tl.where(first, _gram_pick(ds, ds_t, TERMS), _gram_pick(ds_t, ds, TERMS))
    # G_IJ is stored with I's rows along the tile's rows and J's columns contiguous (from ti and tj
    # directly, so the stores vectorise): the tile itself when I = L, its transpose when I = H.  Only
    # the rows of I in [R0, R1) are this block's.
    if first:
        out = val
    else:
        out = tl.trans(val)
    rows_i = ti * BLOCK + tl.arange(0, BLOCK)
    cols_j = tj * BLOCK + tl.arange(0, BLOCK)
    mask_o = ((rows_i >= R0) & (rows_i < R1) & (rows_i < B))[:, None] & (cols_j < B)[None, :]
    tl.store(G + (rows_i - R0).to(tl.int64)[:, None] * stride_g + cols_j[None, :], out.to(G.dtype.element_ty),
             mask=mask_o)
    in_l = mask_l & (rows_l >= R0) & (rows_l < R1)
    in_h = mask_h & (rows_h >= R0) & (rows_h < R1)
    keep = tl.where(first, in_l, mask_l)[:, None] & tl.where(first, mask_h, in_h)[None, :]
    own = tl.where(first, ds, ds_t)  # row I's own dS entries: the L view, or the H view
    tl.store(DscalePart + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(tl.where(keep, own * s_raw, 0.0), 1), 0))


@triton.jit
def _gram_pair_ds(s_raw, scale, diag, rows_i, mask_i, e0_i, e1_i, rows_j, mask_j, e0_j, e1_j, cs, ce,
                  RowMax, RowLse, GradRow, N_EXCLUDE: tl.constexpr, HAS_ROW_MAX: tl.constexpr):
    """The tile pair (I, J), I ≤ J, of a Gram matrix from its raw tile Z_I·Z_Jᵀ: S as the Gram forward
    read it (``diag``: the lower triangle is the transposed upper one), and dS_IJ and (dS_JI)ᵀ laid out
    like the tile, each view under its own row's exclusions and threshold (``_gram_bwd_atomic_kernel``,
    ``_gram_ds_kernel``)."""
    if diag:
        s_raw = tl.where(rows_i[:, None] <= rows_j[None, :], s_raw, tl.trans(s_raw))
    ok = allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
    ok_t = allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
    ok, ok_t = _gram_oks(s_raw, scale, ok, ok_t, row_max_of(RowMax, rows_i, mask_i, HAS_ROW_MAX),
                         row_max_of(RowMax, rows_j, mask_j, HAS_ROW_MAX), HAS_ROW_MAX)
    lse_i, g_i = _row_stats(RowLse, GradRow, rows_i, mask_i)
    lse_j, g_j = _row_stats(RowLse, GradRow, rows_j, mask_j)
    ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
    return s_raw, ds, ds_t
