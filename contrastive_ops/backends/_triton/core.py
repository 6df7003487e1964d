r"""Triton kernels of the similarity-LSE core (primitive ``"sim_lse"``).

The maths is the contract of :mod:`contrastive_ops.core`::

    Q = q[row_index] (B, D)     K = k[col_index] (M, D)     S = scale · Q Kᵀ  (B, M)
    row_lse[i] = LSE_{j allowed for i} S[i, j]      col_lse[j] = LSE_{i : j allowed for i} S[i, j]

with *allowed* = ``col_start[i] <= j < col_end[i]`` minus the ``exclude[i, :]``
entries.  No kernel stores B×M: S is rebuilt tile by tile from Q and K
(``tl.dot`` over D in BLOCK_D chunks, fp32 accumulation, inputs in their own
dtype; fp32 inputs use ``input_precision="ieee"``, never TF32).

Layers (Liger style): ``_sim_lse_fwd_kernel`` / ``_sim_lse_bwd_dq_kernel`` /
``_sim_lse_bwd_dk_kernel`` → the custom ops ``contrastive_ops_triton::sim_lse_fwd``
/ ``sim_lse_bwd`` (``torch.library.triton_op``, so ``torch.compile`` traces
into the kernels) → the launchers ``sim_lse_forward`` / ``sim_lse_backward`` →
the primitive object ``SIM_LSE`` used by ``contrastive_ops.core._SimLSE``.

The ops live in their own namespace ``contrastive_ops_triton``: the C++
extension owns ``TORCH_LIBRARY(contrastive_ops, m)``, and keeping the Triton
ops out of it means neither registration can depend on the other's load order.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tests flip this to allocate every kernel output filled with NaN, so a tile a
# kernel forgets to write shows up as NaN instead of as stale memory.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of ``tl.dot`` for inputs of ``dtype``.

    ``UPCAST``: bf16 ``tl.dot`` is wrong in Triton's interpreter, so there (and
    only there) bf16 tiles are upcast to fp32 before the product.
    ``PREC``: "ieee" for fp32 operands (exact fp32 products, no silent TF32);
    16-bit operands run on tensor cores whatever the value.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return dict(UPCAST=upcast, PREC=prec)


def _block_d(D: int) -> int:
    """Width of the D chunks S is accumulated over (a power of two, at least 16)."""
    cap = 32 if interpreting() else 64
    return max(16, min(triton.next_power_of_2(D), cap))


def _block_do(D: int) -> int:
    """Width of the output D-chunks of the backward (one program per chunk recomputes S).

    On the GPU one chunk up to D = 128, so the common widths recompute S once
    per gradient; wider D splits (the fp32 accumulator stays ≤ BLOCK×128).
    Under the interpreter it equals BLOCK_D, so small tests cover several chunks.
    """
    if interpreting():
        return _block_d(D)
    return max(16, min(triton.next_power_of_2(D), 128))


_SM_COUNT: dict = {}


def n_slots(device: torch.device, n_rows: int, min_block_m: int) -> int:
    """Programs of a persistent forward grid: ≤ 2× the SM count on a GPU, 3 under the interpreter."""
    if device.type != "cuda":
        cap = 3
    else:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        cap = 2 * _SM_COUNT[idx]
    return max(1, min(cap, triton.cdiv(n_rows, min_block_m)))


def _configs(block_names, gpu_choices, interp_choice) -> List[triton.Config]:
    """Autotune configs: a Hopper-oriented sweep on the GPU, one small config under the interpreter."""
    if interpreting():
        return [triton.Config(dict(zip(block_names, interp_choice)), num_warps=1, num_stages=1)]
    out = []
    for blocks, warps, stages in gpu_choices:
        out.append(triton.Config(dict(zip(block_names, blocks)), num_warps=warps, num_stages=stages))
    return out


# (BLOCK_M, BLOCK_N) tiles of S for H100: 128×128 / 128×64 / 64×128 with 4–8 warps
# and 2–4 pipeline stages (BLOCK_D ≤ 64 keeps a stage of both tiles ≤ 32 KiB in
# 16-bit, ≤ 64 KiB in fp32, inside the 228 KiB of shared memory).
_FWD_GPU = [
    ((128, 128), 8, 3), ((128, 128), 8, 4), ((128, 64), 4, 3), ((128, 64), 8, 4),
    ((64, 128), 4, 3), ((64, 64), 4, 4), ((64, 64), 4, 2), ((128, 128), 4, 2),
]
_BWD_GPU = [
    ((128, 64), 8, 3), ((64, 128), 8, 3), ((64, 64), 4, 3), ((128, 128), 8, 2),
    ((64, 64), 4, 2), ((32, 128), 4, 3),
]
_MIN_BLOCK = 32  # smallest BLOCK_M / BLOCK_N of every config list (grid sizing)
_INTERP_BLOCK = (32, 32)


# ---------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------


@triton.jit
def _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Unscaled tile Q[q_rows] · K[k_rows]ᵀ (BLOCK_M, BLOCK_N) in fp32, over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        a = tl.load(Q + q_rows[:, None] * stride_q + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(K + k_rows[:, None] * stride_k + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: inside the matrix, inside [col_start, col_end), not excluded."""
    ok = row_mask[:, None] & col_mask[None, :]
    if HAS_RANGE:
        ok = ok & (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])
    if N_EXCLUDE >= 1:
        ok = ok & (cols[None, :] != e0[:, None])
    if N_EXCLUDE >= 2:
        ok = ok & (cols[None, :] != e1[:, None])
    return ok


@triton.jit
def _row_tile(t, B, RowIndex, ColStart, ColEnd, Exclude,
              BLOCK_M: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
              N_EXCLUDE: tl.constexpr):
    """Rows of row tile ``t``: positions, mask, rows of q (int64), range bounds, exclusions."""
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    if HAS_ROW_INDEX:
        q_rows = tl.load(RowIndex + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        q_rows = rows.to(tl.int64)
    if HAS_RANGE:
        cs = tl.load(ColStart + rows, mask=row_mask, other=0)
        ce = tl.load(ColEnd + rows, mask=row_mask, other=0)
    else:
        cs = rows
        ce = rows
    if N_EXCLUDE >= 1:
        e0 = tl.load(Exclude + rows * N_EXCLUDE, mask=row_mask, other=-1)
    else:
        e0 = rows
    if N_EXCLUDE >= 2:
        e1 = tl.load(Exclude + rows * N_EXCLUDE + 1, mask=row_mask, other=-1)
    else:
        e1 = e0
    return rows, row_mask, q_rows, cs, ce, e0, e1


@triton.jit
def _col_tile(n0, M, ColIndex, BLOCK_N: tl.constexpr, HAS_COL_INDEX: tl.constexpr):
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    if HAS_COL_INDEX:
        k_rows = tl.load(ColIndex + cols, mask=col_mask, other=0).to(tl.int64)
    else:
        k_rows = cols.to(tl.int64)
    return cols, col_mask, k_rows


@triton.jit
def _col_bounds(row_mask, cs, ce, M, BLOCK_N: tl.constexpr, HAS_RANGE: tl.constexpr):
    """Column tiles a row tile must visit: from its rows' smallest start to their largest end."""
    if HAS_RANGE:
        nonempty = row_mask & (ce > cs)
        lo = tl.maximum(tl.min(tl.where(nonempty, cs, M), 0), 0)
        hi = tl.minimum(tl.max(tl.where(nonempty, ce, 0), 0), M)
        lo = (lo // BLOCK_N) * BLOCK_N
    else:
        lo = 0
        hi = M
    return lo, hi


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
# Online log-sum-exp (one pass over S).  For row i, after visiting column tiles
# 1..t with running max m and running sum l = Σ exp(S_ij − m):
#     m' = max(m, max_j S_ij),   l' = l·exp(m − m') + Σ_j exp(S_ij − m'),
# and row_lse = m + log l at the end (−inf when l = 0: nothing allowed).
# Disallowed pairs enter as S = −inf, i.e. exp(·) = 0; m is replaced by 0 while
# it is still −inf so that no −inf − (−inf) = NaN ever appears.
#
# Column LSE in the SAME pass: the program that owns a row tile also knows the
# tile's column partial c_j = LSE_{i in tile} S_ij; it folds c_j into its own
# slot of ColPart (n_slots, M) with logaddexp.  Slots are merged afterwards by
# col_lse = LSE over slots.  A slot is only touched by its program, so no
# atomics; the grid is persistent (n_slots programs loop over row tiles), which
# bounds the buffer to O(n_slots·M) and never B×M.  Each program first fills its
# slot with −inf, so the buffer needs no initialisation and re-running the
# kernel (autotuning) is idempotent.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _FWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_fwd_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColPart,
    B, M, D, stride_q, stride_k,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(Scale)
    offs_n = tl.arange(0, BLOCK_N)
    slot = ColPart + pid.to(tl.int64) * M
    if WANT_COL:
        for n0 in range(0, M, BLOCK_N):
            tl.store(slot + n0 + offs_n, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=n0 + offs_n < M)
        tl.debug_barrier()
    for t in range(pid, tl.cdiv(B, BLOCK_M), nprog):
        rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
            t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
        lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
            s = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC) * scale
            ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
            if WANT_COL:
                c_max = tl.max(s, 0)
                c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_lse = c_safe + tl.log(tl.sum(tl.exp(s - c_safe[None, :]), 0))
                old = tl.load(slot + cols, mask=col_mask, other=float("-inf"))
                tl.store(slot + cols, _logaddexp(old, c_lse), mask=col_mask)
                # the next row tile re-reads these columns, possibly from other threads
                tl.debug_barrier()
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        tl.store(RowLse + rows, lse, mask=row_mask)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
# With P_row = exp(S − row_lse[:, None]), P_col = exp(S − col_lse[None, :]):
#     ∂L/∂S_ij = dS_ij = g_row_i·P_row_ij + g_col_j·P_col_ij    (allowed pairs, else 0)
# and S = scale·Q Kᵀ gives
#     dQ = scale·dS K,   dK = scale·dSᵀ Q,   dscale = Σ_ij dS_ij·(Q Kᵀ)_ij.
# An LSE of −inf (empty set) is replaced by +inf, so its P is exp(−inf) = 0 and
# contributes no gradient.  P is recomputed from the saved LSEs; the tile of dS
# is cast to the input dtype for the second product (fp32 for fp32 inputs).


@triton.jit
def _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL: tl.constexpr):
    s = tl.where(ok, s_raw * scale, float("-inf"))
    lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
    ds = g_r[:, None] * tl.exp(s - lse_r[:, None])
    if WANT_COL:
        lse_c = tl.load(ColLse + cols, mask=col_mask, other=float("-inf"))
        lse_c = tl.where(lse_c == float("-inf"), float("inf"), lse_c)
        g_c = tl.load(GradCol + cols, mask=col_mask, other=0.0)
        ds += g_c[None, :] * tl.exp(s - lse_c[None, :])
    return tl.where(ok, ds, 0.0)


# Row-stationary: one program per (row tile, output D-chunk) streams the column
# tiles, recomputing S over the full D, and accumulates dQ rows of its chunk
# in fp32; the chunk-0 program also sums dS·(Q Kᵀ) for dscale (one partial per
# row tile, summed by torch: deterministic).
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _BWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_bwd_dq_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DQ, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        kt = tl.load(K + k_rows[:, None] * stride_k + offs_o[None, :],
                     mask=col_mask[:, None] & o_mask[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DQ + q_rows[:, None] * stride_dq + offs_o[None, :], acc.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & o_mask[None, :])
    if pid_d == 0:
        tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


# Column-stationary: one program per (column tile, output D-chunk) streams the
# row tiles (skipping those whose ranges miss its columns) and accumulates dK
# = scale·dSᵀ Q for its chunk.  Recomputing S here instead of atomically adding
# into dQ keeps both gradients deterministic.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _BWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_bwd_dk_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DK,
    B, M, D, stride_q, stride_k, stride_dk,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    n0 = pid_n * BLOCK_N
    cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for t in range(0, tl.cdiv(B, BLOCK_M)):
        rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
            t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
        lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
        if (lo < n0 + BLOCK_N) & (hi > n0):
            s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
            ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
            lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
            g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
            ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
            qt = tl.load(Q + q_rows[:, None] * stride_q + offs_o[None, :],
                         mask=row_mask[:, None] & o_mask[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
            acc = tl.dot(tl.trans(ds.to(qt.dtype)), qt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DK + k_rows[:, None] * stride_dk + offs_o[None, :], acc.to(DK.dtype.element_ty),
             mask=col_mask[:, None] & o_mask[None, :])


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
        **_dot_flags(q.dtype),
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


@torch.library.triton_op("contrastive_ops_triton::sim_lse_fwd", mutates_args=())
def _sim_lse_fwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    want_col: bool,
) -> Tuple[Tensor, Tensor]:
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    row_lse = _empty((B,), torch.float32, q.device)
    slots = n_slots(q.device, B, _MIN_BLOCK)
    # Every slot is filled by its program before use, so no initialisation here.
    col_part = _empty((slots if want_col else 0, M), torch.float32, q.device)
    if B > 0:
        torch.library.wrap_triton(_sim_lse_fwd_kernel)[(slots,)](
            q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
            _ptr(col_end, scale), _ptr(exclude, scale), row_lse, _ptr(col_part if want_col else None, row_lse),
            B, M, D, q.stride(0), k.stride(0),
            BLOCK_D=_block_d(D), **flags,
        )
    if want_col:
        col_lse = torch.logsumexp(col_part, 0) if B > 0 else torch.full((M,), float("-inf"), device=q.device)
    else:
        col_lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return row_lse, col_lse


@_sim_lse_fwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
    B, M, _ = _sizes(q, k, row_index, col_index)
    return q.new_empty((B,), dtype=torch.float32), q.new_empty((M if want_col else 0,), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sim_lse_bwd", mutates_args=())
def _sim_lse_bwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    want_col = col_lse.numel() > 0
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    launch = B > 0 and M > 0
    # Rows outside an index list get no gradient: those outputs start at zero.
    dq = _empty(q.shape, q.dtype, q.device) if row_index is None and launch else torch.zeros_like(q)
    dk = _empty(k.shape, k.dtype, k.device) if col_index is None and launch else torch.zeros_like(k)
    dscale_part = torch.zeros((triton.cdiv(B, _MIN_BLOCK),), dtype=torch.float32, device=q.device)
    block_d, block_do = _block_d(D), _block_do(D)
    n_d = triton.cdiv(D, block_do)
    common = (q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
              _ptr(col_end, scale), _ptr(exclude, scale), row_lse, _ptr(col_lse if want_col else None, row_lse),
              grad_row, _ptr(grad_col if want_col else None, grad_row))
    if launch:
        torch.library.wrap_triton(_sim_lse_bwd_dq_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_d)](
            *common, dq, dscale_part, B, M, D, q.stride(0), k.stride(0), dq.stride(0),
            BLOCK_D=block_d, BLOCK_DO=block_do, **flags,
        )
        torch.library.wrap_triton(_sim_lse_bwd_dk_kernel)[lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), n_d)](
            *common, dk, B, M, D, q.stride(0), k.stride(0), dk.stride(0),
            BLOCK_D=block_d, BLOCK_DO=block_do, **flags,
        )
    return dq, dk, dscale_part.sum()


@_sim_lse_bwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def sim_lse_forward(q, k, scale, row_index=None, col_index=None, col_start=None, col_end=None,
                    exclude=None, want_col=False) -> Tuple[Tensor, Tensor]:
    """Row (B,) and column (M,) LSEs in fp32; the column one is 0-element unless ``want_col``."""
    return torch.ops.contrastive_ops_triton.sim_lse_fwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col))


def sim_lse_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                     row_lse, col_lse, grad_row, grad_col) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq like q, dk like k, dscale 0-dim fp32)`` for upstream gradients ``grad_row``/``grad_col``."""
    return torch.ops.contrastive_ops_triton.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, grad_row.float().contiguous(), grad_col.float().contiguous())


class _SimLSEPrimitive:
    """The ``"sim_lse"`` primitive of the Triton backend (see ``contrastive_ops.core``)."""

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
        return sim_lse_forward(q.contiguous(), k.contiguous(), scale.float().reshape(()), row_index,
                               col_index, col_start, col_end, exclude, want_col)

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col):
        dq, dk, dscale = sim_lse_backward(q.contiguous(), k.contiguous(), scale.float().reshape(()),
                                          row_index, col_index, col_start, col_end, exclude,
                                          row_lse, col_lse, grad_row, grad_col)
        return dq, dk, dscale.to(scale.dtype)


SIM_LSE = _SimLSEPrimitive()
