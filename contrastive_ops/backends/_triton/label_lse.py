r"""Triton kernels of the ``"label_lse"`` primitive (maths in ``contrastive_ops.primitives.label_lse``).

G = q·kᵀ (fp32 accumulation), S = scale·G + φ(c_i·|y_i − ŷ_j|) on the allowed pairs
(start_i <= j < end_i, j != exclude_i, and ŷ_j != y_i when ``skip_equal``), −inf elsewhere.
The weight kind and ``skip_equal`` are runtime arguments (one binary for all of them):
φ = ±log(1 + d^p), p = 2 for the kinds 1 and 3 ("L2_inv", "L2"), negative for the
kinds 2 and 3 ("L1", "L2"); log(1 + d) rather than log1p: the term is added to a
logit, so its absolute error (an fp32 ulp of 1 + d) is what counts.

* forward, one program per BLOCK_M rows, streaming BLOCK_N candidates: an
  online max m and l = Σ e^{S−m} give lse = m + log l;
* dq, one program per BLOCK_M rows: P = e^{S − lse} recomputed,
  dG = γ·scale·P, dq += dG·k, and the row's part of dscale, γ_i·Σ_j P_ij·G_ij;
* dk, one program per BLOCK_N candidates, streaming the rows: dk += dGᵀ·q.

No atomics (deterministic); dscale is the ``torch.sum`` of the per-row parts.
Gradient tiles hold all of D (BLOCK_D = next power of two ≥ D, at least 16).
G is formed by one helper, ``tiles.g_tile``, the same way in all three kernels: from
held full-D tiles in 16-bit, from BLOCK_DS-wide chunks in fp32 (tf32x3 keeps
split copies of its operands in registers).  Not tuned otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import dot_flags, empty, g_tile, held_tile, interpreting, launch

Tensor = torch.Tensor


@triton.jit
def _tile(X, rows, rmask, offs_d, D, stride, UPCAST: tl.constexpr):
    t = tl.load(X + rows[:, None].to(tl.int64) * stride + offs_d[None, :],
                mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finalizer on uint32 (primitives/label_lse.py: _fmix32)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _pair_key(seed, rid, cid):
    """(rows, cols) uint32 keys fmix(fmix(seed ⊕ i·K_r) ⊕ j·K_c) of uint32 seed, row ids and column ids."""
    hr = _fmix32(seed ^ (rid * 0x9E3779B1))
    return _fmix32(hr[:, None] ^ (cid * 0x7FEB352D)[None, :])


@triton.jit
def _uniform(key, t):
    """Draw t of the pairs of ``key``: ((h >> 9) + 1/2)·2⁻²³ with h = fmix(key ⊕ (t+1)·K_t), exact in fp32."""
    h = _fmix32(key ^ (tl.cast(t + 1, tl.uint32) * 0x846CA68B))
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _pair_lambda(seed, rid, cid, BETA_A: tl.constexpr, BETA_B: tl.constexpr):
    """λ ~ Beta(a, b) = G_a/(G_a + G_b) of a (rows, cols) tile, G from a + b uniforms (pair_lambda).  a and b
    are compile-time: the draws unroll, and the tile loops around them stay pipelined (no nested loop)."""
    key = _pair_key(seed, rid, cid)
    ga = -tl.log(_uniform(key, 0))
    for t in tl.static_range(1, BETA_A):
        ga += -tl.log(_uniform(key, t))
    gb = -tl.log(_uniform(key, BETA_A))
    for t in tl.static_range(1, BETA_B):
        gb += -tl.log(_uniform(key, BETA_A + t))
    return ga / (ga + gb)


@triton.jit
def _mix_lambda(SeedP, RID, CID, rows, rmask, cols, cmask, BETA_A: tl.constexpr, BETA_B: tl.constexpr):
    """λ of the tile's pairs, from the seed (a 1-element int64 tensor) and the rows' / columns' ids."""
    seed = tl.load(SeedP).to(tl.uint32)
    rid = tl.load(RID + rows, mask=rmask, other=0).to(tl.uint32)
    cid = tl.load(CID + cols, mask=cmask, other=0).to(tl.uint32)
    return _pair_lambda(seed, rid, cid, BETA_A, BETA_B)


@triton.jit
def _logits(g, s, yr, c, st, en, ex, rmask, yc, cols, cmask, kind, skip, lam, b, MIX: tl.constexpr):
    """(S, allowed) of a (rows, cols) tile of G: S = s·G + φ(c·|y − ŷ|), −inf where not allowed; with
    ``MIX``, S = λ·b + (1 − λ)·s·G + φ((1 − λ)·c·|y − ŷ|) (λ the tile's, b the rows' term)."""
    d = c[:, None] * tl.abs(yr[:, None] - yc[None, :])
    if MIX:
        d = d * (1.0 - lam)
    d = tl.where((kind == 1) | (kind == 3), d * d, d)
    w = tl.log(1.0 + d)
    w = tl.where(kind >= 2, -w, w)
    ok = (rmask[:, None] & cmask[None, :] & (cols[None, :] >= st[:, None]) & (cols[None, :] < en[:, None])
          & (cols[None, :] != ex[:, None]))
    ok = ok & ((skip == 0) | (yr[:, None] != yc[None, :]))
    if MIX:
        z = lam * b[:, None] + (1.0 - lam) * (g * s) + w
    else:
        z = g * s + w
    return tl.where(ok, z, float("-inf")), ok


@triton.jit
def _label_lse_uniform_kernel(SeedP, RID, CID, Out, R, C, draw, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The generator's uniforms u_draw of the pairs (RID_i, CID_j), (R, C) fp32: a test hook that runs the
    kernels' own ``_pair_key`` / ``_uniform``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < C
    seed = tl.load(SeedP).to(tl.uint32)
    rid = tl.load(RID + rows, mask=rm, other=0).to(tl.uint32)
    cid = tl.load(CID + cols, mask=cm, other=0).to(tl.uint32)
    u = _uniform(_pair_key(seed, rid, cid), draw)
    tl.store(Out + rows[:, None].to(tl.int64) * C + cols[None, :], u, mask=rm[:, None] & cm[None, :])


@triton.jit
def _label_lse_fwd_kernel(Q, K, Scale, YR, YC, Coef, Start, End, Excl, LSE, RT, RID, CID, SeedP, B, M, D, stride_q,
                          stride_k, kind, skip, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          MIX: tl.constexpr, BETA_A: tl.constexpr, BETA_B: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = held_tile(Q, rows.to(tl.int64), rmask, offs_d, D, stride_q, UPCAST, BLOCK_DS == BLOCK_D)
    s = tl.load(Scale)
    yr = tl.load(YR + rows, mask=rmask, other=0.0)
    c = tl.load(Coef + rows, mask=rmask, other=0.0)
    st = tl.load(Start + rows, mask=rmask, other=0)
    en = tl.load(End + rows, mask=rmask, other=0)
    ex = tl.load(Excl + rows, mask=rmask, other=-1)
    b = tl.zeros([BLOCK_M], tl.float32)
    if MIX:
        b = tl.load(RT + rows, mask=rmask, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_l = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)
        yc = tl.load(YC + cols, mask=cmask, other=0.0)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC, BLOCK_M, BLOCK_N,
                   BLOCK_D, BLOCK_DS)
        lam = 0.0
        if MIX:
            lam = _mix_lambda(SeedP, RID, CID, rows, rmask, cols, cmask, BETA_A, BETA_B)
        z, ok = _logits(g, s, yr, c, st, en, ex, rmask, yc, cols, cmask, kind, skip, lam, b, MIX)
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no candidate yet
        acc_l = acc_l * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    has = acc_l > 0
    tl.store(LSE + rows, tl.where(has, m + tl.log(tl.where(has, acc_l, 1.0)), float("-inf")), mask=rmask)


@triton.jit
def _probs(z, lse):
    """P = e^{S − lse} (0 where S = −inf, and on rows with nothing allowed)."""
    has = lse > float("-inf")
    return tl.where(has[:, None], tl.exp(z - tl.where(has, lse, 0.0)[:, None]), 0.0)


@triton.jit
def _label_lse_dq_kernel(Q, K, Scale, YR, YC, Coef, Start, End, Excl, LSE, RT, RID, CID, SeedP, GL, DQ, Part, DB, B,
                         M, D, stride_q, stride_k, stride_dq, kind, skip, UPCAST: tl.constexpr,
                         PREC: tl.constexpr, MIX: tl.constexpr, BETA_A: tl.constexpr, BETA_B: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = held_tile(Q, rows.to(tl.int64), rmask, offs_d, D, stride_q, UPCAST, BLOCK_DS == BLOCK_D)
    s = tl.load(Scale)
    yr = tl.load(YR + rows, mask=rmask, other=0.0)
    c = tl.load(Coef + rows, mask=rmask, other=0.0)
    st = tl.load(Start + rows, mask=rmask, other=0)
    en = tl.load(End + rows, mask=rmask, other=0)
    ex = tl.load(Excl + rows, mask=rmask, other=-1)
    lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    b = tl.zeros([BLOCK_M], tl.float32)
    if MIX:
        b = tl.load(RT + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pg = tl.zeros([BLOCK_M], tl.float32)
    pl = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        k = _tile(K, cols, cmask, offs_d, D, stride_k, UPCAST)
        yc = tl.load(YC + cols, mask=cmask, other=0.0)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC, BLOCK_M, BLOCK_N,
                   BLOCK_D, BLOCK_DS)
        lam = 0.0
        if MIX:
            lam = _mix_lambda(SeedP, RID, CID, rows, rmask, cols, cmask, BETA_A, BETA_B)
        z, ok = _logits(g, s, yr, c, st, en, ex, rmask, yc, cols, cmask, kind, skip, lam, b, MIX)
        p = _probs(z, lse)
        if MIX:
            pl += tl.sum(p * lam, 1)
            p = p * (1.0 - lam)  # the G part of each logit carries (1 − λ)
        pg += tl.sum(p * g, 1)
        acc = tl.dot((p * (s * gl)[:, None]).to(k.dtype), k, acc, input_precision=PREC)
    tl.store(DQ + rows[:, None].to(tl.int64) * stride_dq + offs_d[None, :], acc.to(DQ.dtype.element_ty),
             mask=rmask[:, None] & (offs_d[None, :] < D))
    tl.store(Part + rows, gl * pg, mask=rmask)
    tl.store(DB + rows, gl * pl, mask=rmask)


@triton.jit
def _label_lse_dk_kernel(Q, K, Scale, YR, YC, Coef, Start, End, Excl, LSE, RT, RID, CID, SeedP, GL, DK, B, M, D,
                         stride_q, stride_k, stride_dk, kind, skip, UPCAST: tl.constexpr,
                         PREC: tl.constexpr, MIX: tl.constexpr, BETA_A: tl.constexpr, BETA_B: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)
    yc = tl.load(YC + cols, mask=cmask, other=0.0)
    s = tl.load(Scale)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < B
        q = _tile(Q, rows, rmask, offs_d, D, stride_q, UPCAST)
        yr = tl.load(YR + rows, mask=rmask, other=0.0)
        c = tl.load(Coef + rows, mask=rmask, other=0.0)
        st = tl.load(Start + rows, mask=rmask, other=0)
        en = tl.load(End + rows, mask=rmask, other=0)
        ex = tl.load(Excl + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
        gl = tl.load(GL + rows, mask=rmask, other=0.0)
        b = tl.zeros([BLOCK_M], tl.float32)
        if MIX:
            b = tl.load(RT + rows, mask=rmask, other=0.0)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC, BLOCK_M, BLOCK_N,
                   BLOCK_D, BLOCK_DS)
        lam = 0.0
        if MIX:
            lam = _mix_lambda(SeedP, RID, CID, rows, rmask, cols, cmask, BETA_A, BETA_B)
        z, ok = _logits(g, s, yr, c, st, en, ex, rmask, yc, cols, cmask, kind, skip, lam, b, MIX)
        p = _probs(z, lse)
        if MIX:
            p = p * (1.0 - lam)
        dg = p * (s * gl)[:, None]
        acc = tl.dot(tl.trans(dg.to(q.dtype)), q, acc, input_precision=PREC)
    tl.store(DK + cols[:, None].to(tl.int64) * stride_dk + offs_d[None, :], acc.to(DK.dtype.element_ty),
             mask=cmask[:, None] & (offs_d[None, :] < D))


def _gpu_config(D: int, dtype: str, mix: bool = False) -> dict:
    """Block sizes and warps on the GPU.  fp32 (tf32x3 keeps split copies of its operands in registers)
    forms G from 16-wide D chunks on 32-wide column tiles and 8 warps: at D = 128 on sm_90a (Triton 3.8)
    its forward, dq and dk spill nothing (full-D G tiles: 0 / 184 / 264 B per thread; at 64 × 64 on
    4 warps 112 / 1488 / 1768 B); 16-bit inputs spill nothing at 64 × 64 on 4 warps.  The mixture
    mode (λ from a + b = 10 unrolled draws per pair) takes the 32-wide tiles on 8 warps in every dtype:
    at 64 × 64 on 4 warps its 16-bit kernels spilled 2.5–4.2 kB per thread."""
    bd = max(16, triton.next_power_of_2(D))
    ds = _block_ds(D, dtype)
    if dtype == "fp32" or mix:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=bd, BLOCK_DS=ds, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64 if bd <= 128 else 32, BLOCK_D=bd, BLOCK_DS=ds, num_warps=4, num_stages=2)


def _block_ds(D: int, dtype: str) -> int:
    """Width of G's D chunks: all of D in 16-bit, 16 in fp32 (in both modes: the interpreter runs both paths)."""
    return 16 if dtype == "fp32" else max(16, triton.next_power_of_2(D))


def _flags(q: Tensor, mix: bool = False) -> dict:
    if interpreting():
        blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=max(16, triton.next_power_of_2(q.shape[1])),
                      BLOCK_DS=_block_ds(q.shape[1], "fp32" if q.dtype == torch.float32 else "bf16"))
    else:
        blocks = _gpu_config(q.shape[1], "fp32" if q.dtype == torch.float32 else "bf16", mix)
    return dict(**dot_flags(q.dtype), **blocks)


def _mix_operands(name, q, B, M, row_term, row_ids, col_ids, seed, beta_a, beta_b):
    """(RT, RID, CID, SeedP, MIX) kernel operands: mixture mode when row_term is given (dummies otherwise)."""
    if row_term is None:
        dummy = empty((1,), torch.int32, q.device)
        return dict(RT=empty((1,), torch.float32, q.device), RID=dummy, CID=dummy,
                    SeedP=torch.zeros(1, dtype=torch.int64, device=q.device)), False
    if row_ids is None or col_ids is None:
        raise ValueError(f"{name}: mixture mode needs row_ids and col_ids")
    same_device(name, q.device, row_term=row_term, row_ids=row_ids, col_ids=col_ids)
    for n, t, size, dt in (("row_term", row_term, B, torch.float32), ("row_ids", row_ids, B, torch.int32),
                           ("col_ids", col_ids, M, torch.int32)):
        if tuple(t.shape) != (size,) or t.dtype != dt:
            raise ValueError(f"{name}: {n} must be ({size},) {dt}, got {tuple(t.shape)} {t.dtype}")
    if not (0 <= seed < 2 ** 32 and beta_a >= 1 and beta_b >= 1 and beta_a + beta_b <= 32):
        raise ValueError(f"{name}: seed must lie in [0, 2**32) and beta_a, beta_b be >= 1 with a sum <= 32, got "
                         f"{seed}, {beta_a}, {beta_b}")
    return dict(RT=row_term.contiguous(), RID=row_ids.contiguous(), CID=col_ids.contiguous(),
                SeedP=torch.tensor([seed], dtype=torch.int64, device=q.device)), True


def _betas(mix: bool, beta_a: int, beta_b: int) -> dict:
    """The kernels' compile-time Beta(a, b) (one binary per (a, b) in mixture mode; 0, 0 without it)."""
    return dict(BETA_A=int(beta_a), BETA_B=int(beta_b)) if mix else dict(BETA_A=0, BETA_B=0)


@torch.library.triton_op("contrastive_ops_triton::label_lse_fwd", mutates_args=())
def _label_lse_fwd_op(q: Tensor, k: Tensor, scale: Tensor, y_row: Tensor, y_col: Tensor, coef: Tensor,
                      col_start: Tensor, col_end: Tensor, exclude: Tensor, kind: int, skip_equal: bool,
                      row_term: Optional[Tensor], row_ids: Optional[Tensor], col_ids: Optional[Tensor], seed: int,
                      beta_a: int, beta_b: int) -> Tensor:
    same_device("label_lse_fwd", q.device, k=k, y_row=y_row, y_col=y_col, coef=coef, col_start=col_start,
                col_end=col_end, exclude=exclude)
    scale = scalar_on("label_lse_fwd", "scale", scale, q.device)
    B, D = q.shape
    M = k.shape[0]
    mix, MIX = _mix_operands("label_lse_fwd", q, B, M, row_term, row_ids, col_ids, seed, beta_a, beta_b)
    lse = empty((B,), torch.float32, q.device)
    if B > 0:
        f = _flags(q, MIX)
        launch("label_lse_fwd", _label_lse_fwd_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, lse, mix["RT"], mix["RID"], mix["CID"],
            mix["SeedP"], B, M, D, q.stride(0), k.stride(0), int(kind), int(skip_equal), MIX=MIX,
            **_betas(MIX, beta_a, beta_b), **f)
    return lse


@_label_lse_fwd_op.register_fake
def _(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, row_term, row_ids, col_ids,
      seed, beta_a, beta_b):
    return q.new_empty((q.shape[0],), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::label_lse_bwd", mutates_args=())
def _label_lse_bwd_op(q: Tensor, k: Tensor, scale: Tensor, y_row: Tensor, y_col: Tensor, coef: Tensor,
                      col_start: Tensor, col_end: Tensor, exclude: Tensor, kind: int, skip_equal: bool,
                      row_term: Optional[Tensor], row_ids: Optional[Tensor], col_ids: Optional[Tensor], seed: int,
                      beta_a: int, beta_b: int, lse: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    same_device("label_lse_bwd", q.device, k=k, y_row=y_row, y_col=y_col, coef=coef, col_start=col_start,
                col_end=col_end, exclude=exclude, lse=lse, grad=grad)
    scale = scalar_on("label_lse_bwd", "scale", scale, q.device)
    B, D = q.shape
    M = k.shape[0]
    mix, MIX = _mix_operands("label_lse_bwd", q, B, M, row_term, row_ids, col_ids, seed, beta_a, beta_b)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    part = empty((B,), torch.float32, q.device)
    db = empty((B,), torch.float32, q.device)
    f = _flags(q, MIX)
    args = (q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, lse, mix["RT"], mix["RID"], mix["CID"],
            mix["SeedP"], grad)
    if B > 0:
        launch("label_lse_dq", _label_lse_dq_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            *args, dq, part, db, B, M, D, q.stride(0), k.stride(0), dq.stride(0), int(kind), int(skip_equal),
            MIX=MIX, **_betas(MIX, beta_a, beta_b), **f)
    if M > 0:
        launch("label_lse_dk", _label_lse_dk_kernel, (triton.cdiv(M, f["BLOCK_N"]),))(
            *args, dk, B, M, D, q.stride(0), k.stride(0), dk.stride(0), int(kind), int(skip_equal), MIX=MIX,
            **_betas(MIX, beta_a, beta_b), **f)
    return dq, dk, part.sum(), db


@_label_lse_bwd_op.register_fake
def _(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, row_term, row_ids, col_ids,
      seed, beta_a, beta_b, lse, grad):
    return (torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32),
            q.new_empty((q.shape[0],), dtype=torch.float32))


def pair_uniforms(seed: int, rows: Tensor, cols: Tensor, draw: int) -> Tensor:
    """The kernels' uniforms u_draw of the pairs (rows_i, cols_j) (int32 ids), (R, C) fp32 (a test hook)."""
    R, C = rows.numel(), cols.numel()
    out = empty((R, C), torch.float32, rows.device)
    if R and C:
        _label_lse_uniform_kernel[(triton.cdiv(R, 16), triton.cdiv(C, 16))](
            torch.tensor([seed], dtype=torch.int64, device=rows.device), rows.to(torch.int32).contiguous(),
            cols.to(torch.int32).contiguous(), out, R, C, int(draw), BLOCK_R=16, BLOCK_C=16)
    return out


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _check(q: Tensor, k: Tensor) -> None:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1] or q.dtype != k.dtype:
        raise ValueError(f"label_lse: q and k must be 2-D of one feature size and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)} {k.dtype}")


def _mix_args(mix):
    """The op's (row_term, row_ids, col_ids, seed, beta_a, beta_b) of the primitive's ``mix`` (None or a tuple)."""
    if mix is None:
        return None, None, None, 0, 0, 0
    row_term, row_ids, col_ids, seed, beta_a, beta_b = mix
    return _f32(row_term), row_ids.contiguous(), col_ids.contiguous(), int(seed), int(beta_a), int(beta_b)


class _LabelLSE:
    """The ``"label_lse"`` primitive of the Triton backend (contract in ``primitives/label_lse.py``)."""

    @staticmethod
    def forward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix=None) -> Tensor:
        _check(q, k)
        return torch.ops.contrastive_ops_triton.label_lse_fwd(
            q.contiguous(), k.contiguous(), _f32(scale).reshape(()), _f32(y_row), _f32(y_col), _f32(coef),
            col_start.contiguous(), col_end.contiguous(), exclude.contiguous(), int(kind), bool(skip_equal),
            *_mix_args(mix))

    @staticmethod
    def backward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix, lse, grad):
        _check(q, k)
        return torch.ops.contrastive_ops_triton.label_lse_bwd(
            q.contiguous(), k.contiguous(), _f32(scale).reshape(()), _f32(y_row), _f32(y_col), _f32(coef),
            col_start.contiguous(), col_end.contiguous(), exclude.contiguous(), int(kind), bool(skip_equal),
            *_mix_args(mix), _f32(lse), _f32(grad))


LABEL_LSE = _LabelLSE()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): forward, dq and dk in every
    input dtype (kind and skip_equal are runtime arguments), without and with the per-pair mixture
    (``MIX``, at SupReMix's Beta(2, 8): a and b are compile-time), at D = 128 (SupReMix's feature size on
    AgeDB) on the GPU configs.  The fp32 dq and dk spill a few hundred bytes per thread on sm_90a
    (``_GATE_FAULTS`` below, measured by ``specs --faults``)."""
    out = []
    D = 128
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        for mix in (False, True):
            cfg = _gpu_config(D, dtype, mix)
            warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            c = dict(UPCAST=False, PREC="tf32x3" if dtype == "fp32" else "tf32", MIX=mix,
                     BETA_A=2 if mix else 0, BETA_B=8 if mix else 0, **cfg)
            common = dict(Q=t, K=t, Scale="*fp32", YR="*fp32", YC="*fp32", Coef="*fp32", Start="*i32", End="*i32",
                          Excl="*i32", LSE="*fp32", RT="*fp32", RID="*i32", CID="*i32", SeedP="*i64")
            sfx = "_mix" if mix else ""
            out.append(dict(name="label_lse_fwd" + sfx, fn=_label_lse_fwd_kernel,
                            args=dict(common, B="i32", M="i32", D="i32", stride_q="i32", stride_k="i32", kind="i32",
                                      skip="i32"),
                            constexprs=c, dtype=dtype, D=D, **warps))
            out.append(dict(name="label_lse_dq" + sfx, fn=_label_lse_dq_kernel,
                            args=dict(common, GL="*fp32", DQ=t, Part="*fp32", DB="*fp32", B="i32", M="i32", D="i32",
                                      stride_q="i32", stride_k="i32", stride_dq="i32", kind="i32", skip="i32"),
                            constexprs=c, dtype=dtype, D=D, **warps))
            out.append(dict(name="label_lse_dk" + sfx, fn=_label_lse_dk_kernel,
                            args=dict(common, GL="*fp32", DK=t, B="i32", M="i32", D="i32", stride_q="i32",
                                      stride_k="i32", stride_dk="i32", kind="i32", skip="i32"),
                            constexprs=c, dtype=dtype, D=D, **warps))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/label_lse.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
    },
    "3.8": {
    },
}
