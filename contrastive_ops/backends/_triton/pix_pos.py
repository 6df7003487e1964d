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

Tiles are 16 × 16 on the GPU as under the interpreter.  Measured for sm_90a with Triton 3.8
(compiled without a GPU, ``specs.compile_spec``; never run on one): every variant compiles; 16-row
tiles are below wgmma's 64, so the products are ``mma.sync``, and the fp32 LSE kernels (all of
D = 256 in registers, tf32x3) spill 20–540 B.  64 × 64 tiles reach wgmma but spill 40–5600 B and
the fp32 LSE kernels then exceed the shared memory of an SM, so they are not used.  Tuning these
kernels needs a GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import dot_flags, empty, launch

Tensor = torch.Tensor

BLOCK_M = 16
BLOCK_N = 16
MAX_D = 1024  # the LSE kernels hold all of D in one block


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
def _pix_pos_lse_fwd_kernel(Q, K, Scale, DXT, DYT, Diag, Ratio, LsePos, LseAll, BK, C0, P, D, H, W,
                            BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, GEO64: tl.constexpr, UPCAST: tl.constexpr,
                            PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = (b * P + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
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
            k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            S = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
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
                            BLOCK_D: tl.constexpr, GEO64: tl.constexpr, UPCAST: tl.constexpr,
                            PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = (b * P + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
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
            if UPCAST:
                k = k.to(tl.float32)
            dot = tl.dot(q, tl.trans(k), input_precision=PREC)
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
    tl.store(Part + rows, ds, mask=m_ok)


# ----------------------------------------------------------------------------- launchers


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


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
        BD = min(_block_d(D), 128)
        grid = (B, triton.cdiv(P, BLOCK_M), triton.cdiv(D, BD))
        launch("pix_pos_sum", _pix_pos_sum_kernel, grid)(
            x, dxt, dyt, diag, ratio, out, cnt, P, D, H, W,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BD, **_geo_flags(x, dxt))
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
        launch("pix_pos_lse_fwd", _pix_pos_lse_fwd_kernel, (B, triton.cdiv(P, BLOCK_M)))(
            q, k, scale, dxt, dyt, diag, ratio, lse_pos, lse_all, k.shape[0], offset, P, D, H, W,
            BATCH=bool(batch_negatives), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D),
            **_geo_flags(q, dxt))
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
        launch("pix_pos_lse_bwd", _pix_pos_lse_bwd_kernel, (B, triton.cdiv(P, BLOCK_M)))(
            q, k, scale, dxt, dyt, diag, ratio, lse_pos, lse_all, g_pos, g_all, dq, part, k.shape[0], offset, P, D,
            H, W,
            BATCH=bool(batch_negatives), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D),
            **_geo_flags(q, dxt))
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
        out.append(dict(name="pix_pos_sum", fn=_pix_pos_sum_kernel,
                        args=dict(X=t, **geo, Out="*fp32", Cnt="*fp32", P="i32", D="i32", H="i32", W="i32"),
                        constexprs=dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=128, **flags),
                        num_warps=4, num_stages=2, dtype=dtype, D=D))
        for batch in (False, True):
            c = dict(BATCH=batch, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=D, **flags)
            b = "_batch" if batch else ""  # a distinct name per variant: the gate's fault tables key by name
            out.append(dict(name="pix_pos_lse_fwd" + b, fn=_pix_pos_lse_fwd_kernel,
                            args=dict(Q=t, K=t, Scale="*fp32", **geo, LsePos="*fp32", LseAll="*fp32", BK="i32",
                                      C0="i32", P="i32", D="i32", H="i32", W="i32"),
                            constexprs=c, num_warps=4, num_stages=2, dtype=dtype, D=D))
            out.append(dict(name="pix_pos_lse_bwd" + b, fn=_pix_pos_lse_bwd_kernel,
                            args=dict(Q=t, K=t, Scale="*fp32", **geo, LsePos="*fp32", LseAll="*fp32",
                                      GPos="*fp32", GAll="*fp32", DQ=t, Part="*fp32", BK="i32", C0="i32", P="i32",
                                      D="i32",
                                      H="i32", W="i32"),
                            constexprs=c, num_warps=4, num_stages=2, dtype=dtype, D=D))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/pix_pos.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
        ("pix_pos_lse_bwd", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 468 B stored / 340 B loaded",
        ("pix_pos_lse_bwd_batch", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd_batch", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd_batch", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 564 B stored / 424 B loaded",
        ("pix_pos_lse_fwd", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 212 B stored / 284 B loaded",
        ("pix_pos_lse_fwd_batch", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd_batch", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd_batch", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 268 B stored / 352 B loaded",
        ("pix_pos_sum", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_sum", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_sum", "fp32", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
    },
    "3.8": {
        ("pix_pos_lse_bwd", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 476 B stored / 352 B loaded",
        ("pix_pos_lse_bwd_batch", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd_batch", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_bwd_batch", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 540 B stored / 420 B loaded",
        ("pix_pos_lse_fwd", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 20 B stored / 16 B loaded",
        ("pix_pos_lse_fwd_batch", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd_batch", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_lse_fwd_batch", "fp32", (256,), "16x16 w4 s2"):
            "tl.dot compiles to mma.sync, not wgmma.mma_async; spills 96 B stored / 80 B loaded",
        ("pix_pos_sum", "bf16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_sum", "fp16", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
        ("pix_pos_sum", "fp32", (256,), "16x16 w4 s2"): "tl.dot compiles to mma.sync, not wgmma.mma_async",
    },
}
