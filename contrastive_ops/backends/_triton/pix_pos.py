r"""Triton kernels of the pixel-pair primitives ``"pix_pos_sum"`` (PixPro) and ``"pix_pos_lse"`` (PixContrast).

The maths is the contract of :mod:`contrastive_ops.primitives.pix_pos`.  No
kernel stores the (B, P, P) positive mask: every tile evaluates it from the
per-axis tables of squared bin-centre distances (``DXT`` (B, W, W), ``DYT``
(B, H, H)) and the larger bin diagonal::

    pos_ij = sqrt_rn(DXT[b, a_i, a_j] + DYT[b, r_i, r_j]) ÷_rn diag[b] < ratio     (p = r·W + a)

with IEEE-rounded square root and division (``GEO64``: float64 tables, whose
``sqrt`` and ``/`` are IEEE), so the predicate equals the official mask bit
for bit, and no multiply-add can be contracted (the squares are rounded in
the tables).

``_pix_pos_sum_kernel`` — grid (B, row tiles, D chunks)::

    Z[b, I, d-chunk] = Σ_{column tiles J} pos[I, J] · X[b, J, d-chunk]      (one tl.dot per tile)
    cnt[b, I]        = Σ_J Σ_j pos[I, j]                                    (written by the d-chunk 0 programs)

The 0/1 tile is exact in any dtype, so the product runs in the input dtype
(fp32: ``PREC``) with fp32 accumulation.  The backward of Z is this kernel
on the upstream gradient with the transposed tables.

``_pix_pos_lse_fwd_kernel`` — grid (B, row tiles), all of D in one block:
the anchors' tile Q_I stays in registers; for each candidate image c (the
anchors' own image b + C0 only, or every one of the BK images with ``BATCH``) and column tile J, S = scale·Q_I·K_cJᵀ,
and two online log-sum-exps run at once, over the positives (c = b and
pos) and over every allowed candidate (positives: c = b + C0 and pos).

``_pix_pos_lse_bwd_kernel`` — same grid; recomputes each S tile::

    W  = g_pos·exp(S − lse_pos)·pos + g_all·exp(S − lse_all)       (rows without positive: no first term)
    dQ_I = scale · Σ_J W·K_J,     dscale part_I = Σ_J Σ_j W ⊙ (Q Kᵀ)

one program per row tile, no atomics; torch sums the dscale parts.

Tiles are 64 × 64 on the GPU (16 × 16 under the interpreter): wgmma's M is 64, so 16-row tiles
compiled to ``mma.sync``.  S is formed by one helper, ``_qk``, from D chunks read from memory
(64-wide, 16-wide in fp32), never from a held full-D tile: with all of D = 256 in registers the
64 × 64 LSE kernels spilled 40–5,600 B per thread on sm_90a.  The LSE backward takes 64 × 32
tiles; in fp32 it splits dQ into 64-wide chunks (one program each, recomputing S) and pix_pos_sum
takes 64-wide D chunks.  Compiled for sm_90a (Triton 3.6 and 3.8), every variant runs on wgmma without
spills; none has run on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import dot_flags, empty, interpreting, launch

Tensor = torch.Tensor

MAX_D = 1024  # the LSE backward holds all of D in one accumulator


@triton.jit
def _pos_tile(DXT, DYT, b, offs_m, offs_n, m_ok, n_ok, P, H, W, diag, ratio, GEO64: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) positive predicate of image b: rows offs_m of view q, columns offs_n of view k."""
    r_i = offs_m // W
    a_i = offs_m % W
    r_j = offs_n // W
    a_j = offs_n % W
    ok = m_ok[:, None] & n_ok[None, :]
    dx2 = tl.load(DXT + b * W * W + a_i[:, None] * W + a_j[None, :], mask=ok, other=0.0)
    dy2 = tl.load(DYT + b * H * H + r_i[:, None] * H + r_j[None, :], mask=ok, other=0.0)
    d2 = dx2 + dy2
    if GEO64:
        dist = tl.sqrt(d2) / diag
    else:
        dist = tl.div_rn(tl.sqrt_rn(d2), diag)
    return (dist < ratio) & ok


@triton.jit
def _pix_pos_sum_kernel(X, DXT, DYT, Diag, Ratio, Out, Cnt, P, D, H, W,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        GEO64: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pd = tl.program_id(2)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    diag = tl.load(Diag + b)
    ratio = tl.load(Ratio)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.float32)
    base = X + b * P * D
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        pos = _pos_tile(DXT, DYT, b, offs_m, offs_n, m_ok, n_ok, P, H, W, diag, ratio, GEO64)
        x = tl.load(base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        acc += tl.dot(pos.to(x.dtype), x, input_precision=PREC)
        cnt += tl.sum(pos.to(tl.float32), axis=1)
    out_rows = (b * P + offs_m).to(tl.int64)
    tl.store(Out + out_rows[:, None] * D + offs_d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
    if pd == 0:
        tl.store(Cnt + out_rows, cnt, mask=m_ok)


@triton.jit
def _lse_step(m, s, x):
    """Fold the (BLOCK_M, BLOCK_N) tile ``x`` (−inf where not in the set) into the running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: nothing to shift
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def _qk(Q, K, rows, m_ok, cols, n_ok, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Q_I·K_Jᵀ summed over BLOCK_DS-wide chunks of D read from memory in increasing order: the one way
    the forward and the backward form S (no full-D tile is held in registers)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offs = tl.arange(0, BLOCK_DS)
    for d0 in range(0, D, BLOCK_DS):
        d_ok = d0 + offs < D
        q = tl.load(Q + rows[:, None] * D + d0 + offs[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K + cols[:, None] * D + d0 + offs[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)
    return acc


@triton.jit
def _pix_pos_lse_fwd_kernel(Q, K, Scale, DXT, DYT, Diag, Ratio, LsePos, LseAll, BK, C0, P, D, H, W,
                            BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_DS: tl.constexpr, GEO64: tl.constexpr, UPCAST: tl.constexpr,
                            PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    rows = (b * P + offs_m).to(tl.int64)
    scale = tl.load(Scale)
    diag = tl.load(Diag + b)
    ratio = tl.load(Ratio)
    mp = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sp = tl.zeros([BLOCK_M], tl.float32)
    ma = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sa = tl.zeros([BLOCK_M], tl.float32)
    own = b + C0  # the anchors' own image among the BK candidate images
    if BATCH:
        c_lo = 0
        c_hi = BK
    else:
        c_lo = own
        c_hi = own + 1
    for c in range(c_lo, c_hi):
        for n0 in range(0, P, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < P
            cols = (c * P + offs_n).to(tl.int64)
            S = _qk(Q, K, rows, m_ok, cols, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_DS, UPCAST, PREC) * scale
            ok = m_ok[:, None] & n_ok[None, :]
            pos = _pos_tile(DXT, DYT, b, offs_m, offs_n, m_ok, n_ok, P, H, W, diag, ratio, GEO64) & (c == own)
            mp, sp = _lse_step(mp, sp, tl.where(pos, S, float("-inf")))
            ma, sa = _lse_step(ma, sa, tl.where(ok, S, float("-inf")))
    tl.store(LsePos + rows, mp + tl.log(sp), mask=m_ok)
    tl.store(LseAll + rows, ma + tl.log(sa), mask=m_ok)


@triton.jit
def _pix_pos_lse_bwd_kernel(Q, K, Scale, DXT, DYT, Diag, Ratio, LsePos, LseAll, GPos, GAll, DQ, Part,
                            BK, C0, P, D, H, W,
                            BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr, GEO64: tl.constexpr,
                            UPCAST: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pd = tl.program_id(2)  # the BLOCK_D-wide chunk of dQ this program accumulates
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = (b * P + offs_m).to(tl.int64)
    scale = tl.load(Scale)
    diag = tl.load(Diag + b)
    ratio = tl.load(Ratio)
    lp = tl.load(LsePos + rows, mask=m_ok, other=float("-inf"))
    la = tl.load(LseAll + rows, mask=m_ok, other=float("-inf"))
    gp = tl.load(GPos + rows, mask=m_ok, other=0.0)
    ga = tl.load(GAll + rows, mask=m_ok, other=0.0)
    # A row without positive (lse_pos = −inf) takes no positive term: its LSE is replaced by +inf, so
    # exp(S − lse) is 0 (not inf · 0); likewise a row without candidate.
    lp = tl.where(lp == float("-inf"), float("inf"), lp)
    la = tl.where(la == float("-inf"), float("inf"), la)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    own = b + C0  # the anchors' own image among the BK candidate images
    if BATCH:
        c_lo = 0
        c_hi = BK
    else:
        c_lo = own
        c_hi = own + 1
    for c in range(c_lo, c_hi):
        for n0 in range(0, P, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < P
            cols = (c * P + offs_n).to(tl.int64)
            k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            dot = _qk(Q, K, rows, m_ok, cols, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_DS, UPCAST, PREC)
            S = dot * scale
            ok = m_ok[:, None] & n_ok[None, :]
            pos = _pos_tile(DXT, DYT, b, offs_m, offs_n, m_ok, n_ok, P, H, W, diag, ratio, GEO64) & (c == own)
            w_pos = tl.where(pos, tl.exp(S - lp[:, None]), 0.0) * gp[:, None]
            w_all = tl.where(ok, tl.exp(S - la[:, None]), 0.0) * ga[:, None]
            w = w_pos + w_all
            acc += tl.dot(w, k.to(tl.float32), input_precision=PREC)
            ds += tl.sum(w * dot, axis=1)
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], (acc * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if pd == 0:
        tl.store(Part + rows, ds, mask=m_ok)


# ----------------------------------------------------------------------------- launchers


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _gpu(interp: Optional[bool]) -> bool:
    return not (interpreting() if interp is None else interp)


def _dq_chunk(D: int, dtype: torch.dtype, interp: Optional[bool] = None) -> int:
    """Width of the LSE backward's dQ chunks (one program per chunk, each recomputing S): all of D,
    64 in fp32 on the GPU (a 64 × 256 fp32 accumulator beside tf32x3 operands spills 1.2–1.6 KB);
    16 under the interpreter, so its tests run several chunks."""
    if not _gpu(interp):
        return min(_block_d(D), 16)
    return min(_block_d(D), 64) if dtype == torch.float32 else _block_d(D)


def _sum_chunk(D: int, dtype: torch.dtype, interp: Optional[bool] = None) -> int:
    """Width of pix_pos_sum's D chunks (one program each): 128, 64 in fp32 on the GPU (128 spills)."""
    return min(_block_d(D), 64 if dtype == torch.float32 and _gpu(interp) else 128)


def _tiles(dtype: torch.dtype, interp: Optional[bool] = None, lse_bwd: bool = False) -> dict:
    """Tile sizes and warps: 16 × 16 under the interpreter; on the GPU 64 × 64 on 8 warps (wgmma's M is
    64; 64 × 32 in the LSE backward, which spills 4–64 B beside 64 columns with a batch of negatives),
    S formed from 64-wide D chunks (16-wide in fp32, whose tf32x3 splits take registers); the
    interpreter runs 16-wide chunks, so its tests cover the chunked S."""
    if not _gpu(interp):
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DS=16)
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=64, BLOCK_N=32 if lse_bwd else 64, BLOCK_DS=16 if fp32 else 64, num_warps=8)


def _geo_flags(x: Tensor, dxt: Tensor) -> dict:
    return dict(GEO64=dxt.dtype == torch.float64, **dot_flags(x.dtype))


@torch.library.triton_op("contrastive_ops_triton::pix_pos_sum", mutates_args=())
def _pix_pos_sum_op(x: Tensor, dxt: Tensor, dyt: Tensor, diag: Tensor, ratio: Tensor, H: int,
                    W: int) -> Tuple[Tensor, Tensor]:
    same_device("pix_pos_sum", x.device, dxt=dxt, dyt=dyt, diag=diag, ratio=ratio)
    B, P, D = x.shape
    out = empty((B, P, D), torch.float32, x.device)
    cnt = empty((B, P), torch.float32, x.device)
    if B * P * D > 0:
        BD = _sum_chunk(D, x.dtype)
        t = _tiles(x.dtype)
        t.pop("BLOCK_DS")
        grid = (B, triton.cdiv(P, t["BLOCK_M"]), triton.cdiv(D, BD))
        launch("pix_pos_sum", _pix_pos_sum_kernel, grid)(
            x, dxt, dyt, diag, ratio, out, cnt, P, D, H, W, BLOCK_D=BD, **t, **_geo_flags(x, dxt))
    elif B * P > 0:
        out.zero_()
        cnt.zero_()
    return out, cnt


@_pix_pos_sum_op.register_fake
def _(x, dxt, dyt, diag, ratio, H, W):
    B, P, D = x.shape
    return x.new_empty((B, P, D), dtype=torch.float32), x.new_empty((B, P), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::pix_pos_lse_fwd", mutates_args=())
def _pix_pos_lse_fwd_op(q: Tensor, k: Tensor, scale: Tensor, dxt: Tensor, dyt: Tensor, diag: Tensor,
                        ratio: Tensor, H: int, W: int, batch_negatives: bool, offset: int) -> Tuple[Tensor, Tensor]:
    same_device("pix_pos_lse", q.device, k=k, dxt=dxt, dyt=dyt, diag=diag, ratio=ratio)
    scale = scalar_on("pix_pos_lse", "scale", scale, q.device)
    B, P, D = q.shape
    lse_pos = empty((B, P), torch.float32, q.device)
    lse_all = empty((B, P), torch.float32, q.device)
    if B * P > 0:
        t = _tiles(q.dtype)
        launch("pix_pos_lse_fwd", _pix_pos_lse_fwd_kernel, (B, triton.cdiv(P, t["BLOCK_M"])))(
            q, k, scale, dxt, dyt, diag, ratio, lse_pos, lse_all, k.shape[0], offset, P, D, H, W,
            BATCH=bool(batch_negatives), **t, **_geo_flags(q, dxt))
    return lse_pos, lse_all


@_pix_pos_lse_fwd_op.register_fake
def _(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset):
    B, P, _ = q.shape
    return q.new_empty((B, P), dtype=torch.float32), q.new_empty((B, P), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::pix_pos_lse_bwd", mutates_args=())
def _pix_pos_lse_bwd_op(q: Tensor, k: Tensor, scale: Tensor, dxt: Tensor, dyt: Tensor, diag: Tensor,
                        ratio: Tensor, H: int, W: int, batch_negatives: bool, offset: int, lse_pos: Tensor,
                        lse_all: Tensor,
                        g_pos: Tensor, g_all: Tensor) -> Tuple[Tensor, Tensor]:
    same_device("pix_pos_lse", q.device, k=k, dxt=dxt, dyt=dyt, diag=diag, ratio=ratio, lse_pos=lse_pos,
                lse_all=lse_all, g_pos=g_pos, g_all=g_all)
    scale = scalar_on("pix_pos_lse", "scale", scale, q.device)
    B, P, D = q.shape
    dq = empty((B, P, D), q.dtype, q.device)
    part = empty((B, P), torch.float32, q.device)
    if B * P > 0:
        t = _tiles(q.dtype, lse_bwd=True)
        bd = _dq_chunk(D, q.dtype)
        launch("pix_pos_lse_bwd", _pix_pos_lse_bwd_kernel, (B, triton.cdiv(P, t["BLOCK_M"]), triton.cdiv(D, bd)))(
            q, k, scale, dxt, dyt, diag, ratio, lse_pos, lse_all, g_pos, g_all, dq, part, k.shape[0], offset, P, D,
            H, W, BATCH=bool(batch_negatives), BLOCK_D=bd, **t, **_geo_flags(q, dxt))
    return dq, part.sum()


@_pix_pos_lse_bwd_op.register_fake
def _(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset, lse_pos, lse_all, g_pos, g_all):
    return torch.empty_like(q), q.new_empty((), dtype=torch.float32)


def _f32(v: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(v, device=like.device).to(torch.float32).reshape(()).contiguous()


def _check_d(D: int) -> None:
    if D > MAX_D:
        raise ValueError(f"pix_pos_lse: the Triton kernels hold all of D in one block; D = {D} > {MAX_D} "
                         "is not implemented for backend 'triton'")


class _PixPosSum:
    """The ``"pix_pos_sum"`` primitive of the Triton backend (contract in ``primitives.pix_pos``)."""

    @staticmethod
    def forward(x, dxt, dyt, diag, ratio, H, W):
        return torch.ops.contrastive_ops_triton.pix_pos_sum(x.contiguous(), dxt, dyt, diag, ratio, H, W)


class _PixPosLSE:
    """The ``"pix_pos_lse"`` primitive of the Triton backend (contract in ``primitives.pix_pos``)."""

    @staticmethod
    def forward(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset):
        _check_d(q.shape[-1])
        return torch.ops.contrastive_ops_triton.pix_pos_lse_fwd(q.contiguous(), k.contiguous(), _f32(scale, q),
                                                                dxt, dyt, diag, ratio, H, W, batch_negatives,
                                                                offset)

    @staticmethod
    def backward(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset, lse_pos, lse_all, g_pos,
                 g_all):
        _check_d(q.shape[-1])
        return torch.ops.contrastive_ops_triton.pix_pos_lse_bwd(
            q.contiguous(), k.contiguous(), _f32(scale, q), dxt, dyt, diag, ratio, H, W, batch_negatives, offset,
            lse_pos.contiguous(), lse_all.contiguous(), g_pos.float().contiguous(), g_all.float().contiguous())


PIX_POS_SUM = _PixPosSum()
PIX_POS_LSE = _PixPosLSE()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): PixPro's D = 256, fp32 tables."""
    out = []
    geo = dict(DXT="*fp32", DYT="*fp32", Diag="*fp32", Ratio="*fp32")
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        flags = dict(GEO64=False, UPCAST=False, PREC="tf32x3" if dtype == "fp32" else "tf32")
        D = 256
        tdt = torch.float32 if dtype == "fp32" else torch.bfloat16
        tiles = _tiles(tdt, interp=False)
        w = tiles.pop("num_warps")
        ds = tiles.pop("BLOCK_DS")
        out.append(dict(name="pix_pos_sum", fn=_pix_pos_sum_kernel,
                        args=dict(X=t, **geo, Out="*fp32", Cnt="*fp32", P="i32", D="i32", H="i32", W="i32"),
                        constexprs=dict(**tiles, BLOCK_D=_sum_chunk(D, tdt, interp=False), **flags), num_warps=w,
                        num_stages=2, dtype=dtype, D=D))
        for batch in (False, True):
            c = dict(BATCH=batch, **tiles, BLOCK_DS=ds, **flags)
            b = "_batch" if batch else ""  # a distinct name per variant: the gate's fault tables key by name
            out.append(dict(name="pix_pos_lse_fwd" + b, fn=_pix_pos_lse_fwd_kernel,
                            args=dict(Q=t, K=t, Scale="*fp32", **geo, LsePos="*fp32", LseAll="*fp32", BK="i32",
                                      C0="i32", P="i32", D="i32", H="i32", W="i32"),
                            constexprs=c, num_warps=w, num_stages=2, dtype=dtype, D=D))
            out.append(dict(name="pix_pos_lse_bwd" + b, fn=_pix_pos_lse_bwd_kernel,
                            args=dict(Q=t, K=t, Scale="*fp32", **geo, LsePos="*fp32", LseAll="*fp32",
                                      GPos="*fp32", GAll="*fp32", DQ=t, Part="*fp32", BK="i32", C0="i32", P="i32",
                                      D="i32", H="i32", W="i32"),
                            constexprs=dict(c, BLOCK_N=_tiles(tdt, False, lse_bwd=True)["BLOCK_N"],
                                            BLOCK_D=_dq_chunk(D, tdt, interp=False)),
                            num_warps=w, num_stages=2, dtype=dtype, D=D))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/pix_pos.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
    },
    "3.8": {
    },
}
