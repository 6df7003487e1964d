r"""Forward kernels of the sim_lse primitive: the general (split-M) forward and the Gram forward.

The maths, the paths and their costs are described in :mod:`.sim_lse` (which
launches these kernels and re-exports their names).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    COL_REF_GROUP, FWD_N_GPU, INTERP_N, SYM_FWD_GPU, allowed, allowed_t, autotune, col_lse, col_tile, configs,
    held_tile, load_tile, logaddexp, lse_of, online_rows, row_max_of, row_span, row_tile, rows_and_cols, s_tile,
    scaled_s, under_row_max, under_row_max_t,
)

# The launch flags every general kernel is autotuned on (see ``sim_lse._flags``).
_FLAG_KEYS = ["HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL", "PREC", "HAS_ROW_MAX"]


# ---------------------------------------------------------------------------
# Forward, general: grid (row tiles, column splits)
# ---------------------------------------------------------------------------
@triton.jit
def _fwd_tile(Q, K, q_rows, row_mask, q_tile, n0, m_i, l_i, col_out, ref_out, scale, rmax, cs, ce, e0, e1, M, D,
              ColIndex, stride_q, stride_k, offs_d, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
              N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_ROW_MAX: tl.constexpr, MASKED: tl.constexpr):
    """Fold the column tile at ``n0`` into the rows' running (max, sum) and store its columns' partials
    (``rows_and_cols``): the values at ``col_out``, the tile's reference at ``ref_out``, once per
    ``COL_REF_GROUP`` columns.
    ``MASKED``: every entry under ``allowed`` and the row threshold; otherwise (a plain tile inside
    the matrix) S as it is, rows past B left out of the columns by ``rows_and_cols``."""
    cols, col_mask, k_rows = col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
    k_tile = held_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST, ONE_CHUNK)
    s_raw = s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k, q_tile, k_tile,
                   BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
    if MASKED:
        ok = allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ok = under_row_max(ok, s_raw, scale, rmax, HAS_ROW_MAX)
    else:
        ok = True
    s = scaled_s(s_raw, scale, ok)
    if WANT_COL:
        m_i, l_i, c_ref, c_val = rows_and_cols(s, m_i, l_i, row_mask, col_mask if MASKED else True)
        tl.store(col_out + cols, c_val, mask=col_mask)
        groups = n0 // COL_REF_GROUP + tl.arange(0, BLOCK_N // COL_REF_GROUP)
        tl.store(ref_out + groups, tl.full((BLOCK_N // COL_REF_GROUP,), 0.0, tl.float32) + c_ref,
                 mask=groups < tl.cdiv(M, COL_REF_GROUP))
    else:
        m_i, l_i = online_rows(s, m_i, l_i)
    return m_i, l_i


@autotune(configs(("BLOCK_N",), FWD_N_GPU, INTERP_N), key=["D", "B_LOG2", "M_LOG2", "BLOCK_M"] + _FLAG_KEYS)
@triton.jit
def _fwd_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowMax, RowPart, ColPart, ColRef,
    B, M, D, stride_q, stride_k, cols_per_split, B_LOG2, M_LOG2,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_MAX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1, lo, hi = row_span(
        pid_m, B, M, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, BLOCK_N, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    rmax = row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX)
    s0 = pid_s * cols_per_split  # a multiple of every BLOCK_N
    s1 = tl.minimum(s0 + cols_per_split, M)
    a = tl.maximum(lo, s0)  # tile-aligned
    b = tl.minimum(hi, s1)
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = held_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST, ONE_CHUNK)  # the Q tile is loaded once
    col_out = ColPart + pid_m.to(tl.int64) * M
    ref_out = ColRef + pid_m.to(tl.int64) * tl.cdiv(M, COL_REF_GROUP)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n_tiles = tl.cdiv(tl.maximum(b - a, 0), BLOCK_N)
    # Without ranges, exclusions or thresholds every pair of a tile whose columns all lie in the
    # matrix is allowed: those tiles take no per-entry mask (rows past B are left out per row), and
    # only a ragged last tile is masked entry by entry.
    plain = not HAS_RANGE and N_EXCLUDE == 0 and not HAS_ROW_MAX
    n_plain = tl.maximum(b - a, 0) // BLOCK_N if plain else 0
    for i in range(0, n_plain):
        m_i, l_i = _fwd_tile(Q, K, q_rows, row_mask, q_tile, a + i * BLOCK_N, m_i, l_i, col_out, ref_out, scale,
                             rmax, cs, ce, e0, e1, M, D, ColIndex, stride_q, stride_k, offs_d, HAS_COL_INDEX,
                             HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC, BLOCK_D, ONE_CHUNK, BLOCK_M, BLOCK_N,
                             HAS_ROW_MAX, False)
    for i in range(n_plain, n_tiles):
        m_i, l_i = _fwd_tile(Q, K, q_rows, row_mask, q_tile, a + i * BLOCK_N, m_i, l_i, col_out, ref_out, scale,
                             rmax, cs, ce, e0, e1, M, D, ColIndex, stride_q, stride_k, offs_d, HAS_COL_INDEX,
                             HAS_RANGE, N_EXCLUDE, WANT_COL, UPCAST, PREC, BLOCK_D, ONE_CHUNK, BLOCK_M, BLOCK_N,
                             HAS_ROW_MAX, True)
    tl.store(RowPart + pid_s.to(tl.int64) * B + rows, lse_of(m_i, l_i), mask=row_mask)
    if WANT_COL:  # the split's columns no row of this tile may reach: an LSE of −inf (reference +inf)
        offs_n = tl.arange(0, BLOCK_N)
        neg = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        offs_g = tl.arange(0, BLOCK_N // COL_REF_GROUP)
        inf = tl.full((BLOCK_N // COL_REF_GROUP,), float("inf"), tl.float32)
        n_groups = tl.cdiv(M, COL_REF_GROUP)
        end = tl.minimum(a, s1)
        for n0 in range(s0, end, BLOCK_N):
            tl.store(col_out + n0 + offs_n, neg, mask=n0 + offs_n < end)
            tl.store(ref_out + n0 // COL_REF_GROUP + offs_g, inf, mask=n0 // COL_REF_GROUP + offs_g < n_groups)
        t_end = a + n_tiles * BLOCK_N
        for n0 in range(t_end, s1, BLOCK_N):
            tl.store(col_out + n0 + offs_n, neg, mask=n0 + offs_n < s1)
            tl.store(ref_out + n0 // COL_REF_GROUP + offs_g, inf, mask=n0 // COL_REF_GROUP + offs_g < n_groups)


# ---------------------------------------------------------------------------
# Forward, Gram: program p owns row tiles p and T−1−p, each over J ≥ I
# ---------------------------------------------------------------------------
@autotune(configs((), SYM_FWD_GPU, ()), key=["D", "B_LOG2", "BLOCK", "N_EXCLUDE", "PREC", "HAS_ROW_MAX"])
@triton.jit
def _gram_fwd_kernel(
    Z, Scale, Exclude, RowMax, Part, B, D, stride_z, B_LOG2,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_MAX: tl.constexpr,
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
        rmax_i = row_max_of(RowMax, rows_i, mask_i, HAS_ROW_MAX)  # row view: rows I; column view: their columns
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
        ok_r = under_row_max(allowed(rows_i, mask_i, mask_i, cs, ce, e0_i, e1_i, False, N_EXCLUDE), s_raw, scale,
                             rmax_i, HAS_ROW_MAX)
        ok_c = under_row_max_t(allowed_t(rows_i, mask_i, mask_i, e0_i, e1_i, N_EXCLUDE), s_raw, scale, rmax_i,
                               HAS_ROW_MAX)
        m_i, l_i = online_rows(scaled_s(s_raw, scale, ok_r & upper),
                               tl.full((BLOCK,), float("-inf"), tl.float32), tl.zeros((BLOCK,), tl.float32))
        diag_col = col_lse(scaled_s(s_raw, scale, ok_c & (rows_i[:, None] < rows_i[None, :])))
        for tj in range(ti + 1, T):
            rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = row_tile(
                tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
            zj = held_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST, ONE_CHUNK)
            s_raw = s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z, zi, zj,
                           BLOCK, BLOCK, BLOCK_D, ONE_CHUNK, UPCAST, PREC)
            ok_r = under_row_max(allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE), s_raw, scale,
                                 rmax_i, HAS_ROW_MAX)
            m_i, l_i = online_rows(scaled_s(s_raw, scale, ok_r), m_i, l_i)
            ok_c = under_row_max_t(allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE), s_raw, scale,
                                   row_max_of(RowMax, rows_j, mask_j, HAS_ROW_MAX), HAS_ROW_MAX)
            tl.store(part + rows_j, col_lse(scaled_s(s_raw, scale, ok_c)), mask=mask_j)
        tl.store(part + rows_i, logaddexp(lse_of(m_i, l_i), diag_col), mask=mask_i)
