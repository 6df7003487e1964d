r"""Triton kernels of the SigLIP pair sum (primitive ``"siglip"``).

Maths (dense version: ``contrastive_ops.primitives.siglip_pairs.siglip_pairs_reference``)::

    l_ij = scale · x_i·y_j + bias          z_ij = +1 if i == j else −1
    L    = Σ_ij softplus(−z_ij · l_ij)     (= −Σ_ij log σ(z_ij · l_ij))

Gradient, with upstream ``grad`` (a 0-dim tensor, read inside the kernels):
d softplus(t)/dt = σ(t), so with t_ij = −z_ij·l_ij::

    G_ij   = grad · (−z_ij) · σ(t_ij)
    dx = scale · G Y,   dy = scale · Gᵀ X,   dscale = Σ_ij G_ij · x_i·y_j,   dbias = Σ_ij G_ij

Tiles of l are rebuilt from X and Y with :func:`.tiles.s_tile`, as S in :mod:`.sim_lse`; nothing of
size B×M is stored.  Partial sums (one per row tile) are written, not added,
and summed by torch: deterministic and safe to re-run while autotuning.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import (BWD_DQ_GPU, BWD_GPU, FWD_GPU, INTERP_BLOCK, SPEC_DS, SPEC_DTYPES, acc_fits, autotune, block_d,
                    block_do, checked_backward, col_tile, configs, dot_flags, empty, gemm_block_rows, gpu_block_do,
                    gpu_dot_flags, gpu_choices, launch, log2_bucket, matrix_writer, min_block, s_tile, spec)

Tensor = torch.Tensor

# "gemm": G blocks to memory, the products in cuBLAS (``_gemm_backward``); "auto" (default): that where
# ``costs.gemm_pays``, else the dx/dy kernels (``tiles.BACKWARD_PATHS``, read at import like sim_lse's).
BACKWARD = os.environ.get("CONTRASTIVE_OPS_TRITON_BACKWARD", "auto")
# The GEMM backward's G buffer: blocks of rows × all M columns, at most this many bytes.
GEMM_G_BYTES = 1 << 30


@triton.jit
def _softplus(t):
    """log(1 + eᵗ) = max(t, 0) + log1p(e^{−|t|}), with an accurate log1p (u = 1 + e: log(u)·e/(u − 1))."""
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(t, 0.0) + log1p


@triton.jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tile_rows(t, B, BLOCK_M: tl.constexpr):
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < B, rows.to(tl.int64)


@triton.jit
def _neg_z(rows, cols):
    """−z_ij: −1 on the diagonal (positive pairs), +1 elsewhere."""
    return tl.where(rows[:, None] == cols[None, :], -1.0, 1.0)


# Forward: one program per row tile streams the column tiles and writes the
# tile's Σ softplus(−z·l) over in-range pairs.
@autotune(configs(("BLOCK_M", "BLOCK_N"), FWD_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2", "PREC"])
@triton.jit
def _siglip_fwd_kernel(X, Y, Scale, Bias, Part, B, M, D, stride_x, stride_y, B_LOG2, M_LOG2,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.load(Scale)
    bias = tl.load(Bias)
    rows, row_mask, x_rows = _tile_rows(pid, B, BLOCK_M)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols, col_mask, y_rows = col_tile(n0, M, X, BLOCK_N, False)
        xy = s_tile(X, Y, x_rows, y_rows, row_mask, col_mask, D, stride_x, stride_y, 0, 0,
                    BLOCK_M, BLOCK_N, BLOCK_D, False, UPCAST, PREC)
        t = _neg_z(rows, cols) * (scale * xy + bias)
        ok = row_mask[:, None] & col_mask[None, :]
        total += tl.sum(tl.where(ok, _softplus(t), 0.0), 1)
    tl.store(Part + pid, tl.sum(total, 0))


@triton.jit
def _siglip_g_tile(X, Y, x_rows, y_rows, rows, cols, row_mask, col_mask, D, stride_x, stride_y, scale, bias, grad,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(G, x·y) tiles: G = grad·(−z)·σ(−z·l), zero outside the matrix."""
    xy = s_tile(X, Y, x_rows, y_rows, row_mask, col_mask, D, stride_x, stride_y, 0, 0,
                BLOCK_M, BLOCK_N, BLOCK_D, False, UPCAST, PREC)
    nz = _neg_z(rows, cols)
    g = grad * nz * _sigmoid(nz * (scale * xy + bias))
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    return g, xy


# Row-stationary dx = scale·G Y per (row tile, output D-chunk); chunk 0 also
# writes the tile's Σ G·x·y (dscale) and Σ G (dbias).
@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_DQ_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2", "PREC"])
@triton.jit
def _siglip_bwd_dx_kernel(X, Y, Scale, Bias, Grad, DX, ScalePart, BiasPart, B, M, D, stride_x, stride_y, stride_dx,
                          B_LOG2, M_LOG2,
                          UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    bias = tl.load(Bias)
    grad = tl.load(Grad)
    rows, row_mask, x_rows = _tile_rows(pid_m, B, BLOCK_M)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    d_scale = tl.zeros((BLOCK_M,), tl.float32)
    d_bias = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols, col_mask, y_rows = col_tile(n0, M, X, BLOCK_N, False)
        g, xy = _siglip_g_tile(X, Y, x_rows, y_rows, rows, cols, row_mask, col_mask, D, stride_x, stride_y,
                               scale, bias, grad, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        d_scale += tl.sum(g * xy, 1)
        d_bias += tl.sum(g, 1)
        yt = tl.load(Y + y_rows[:, None] * stride_y + offs_o[None, :],
                     mask=col_mask[:, None] & o_mask[None, :], other=0.0)
        if UPCAST:
            yt = yt.to(tl.float32)
        acc = tl.dot(g.to(yt.dtype), yt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DX + x_rows[:, None] * stride_dx + offs_o[None, :], acc.to(DX.dtype.element_ty),
             mask=row_mask[:, None] & o_mask[None, :])
    if pid_d == 0:
        tl.store(ScalePart + pid_m, tl.sum(d_scale, 0))
        tl.store(BiasPart + pid_m, tl.sum(d_bias, 0))


# Column-stationary dy = scale·Gᵀ X per (column tile, output D-chunk).
@autotune(configs(("BLOCK_M", "BLOCK_N"), BWD_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2", "PREC"])
@triton.jit
def _siglip_bwd_dy_kernel(X, Y, Scale, Bias, Grad, DY, B, M, D, stride_x, stride_y, stride_dy,
                          B_LOG2, M_LOG2,
                          UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    bias = tl.load(Bias)
    grad = tl.load(Grad)
    cols, col_mask, y_rows = col_tile(pid_n * BLOCK_N, M, X, BLOCK_N, False)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for t in range(0, tl.cdiv(B, BLOCK_M)):
        rows, row_mask, x_rows = _tile_rows(t, B, BLOCK_M)
        g, xy = _siglip_g_tile(X, Y, x_rows, y_rows, rows, cols, row_mask, col_mask, D, stride_x, stride_y,
                               scale, bias, grad, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        xt = tl.load(X + x_rows[:, None] * stride_x + offs_o[None, :],
                     mask=row_mask[:, None] & o_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(tl.trans(g.to(xt.dtype)), xt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DY + y_rows[:, None] * stride_dy + offs_o[None, :], acc.to(DY.dtype.element_ty),
             mask=col_mask[:, None] & o_mask[None, :])


def out_chunks(D: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """n_d: the backward's output D-chunks; the launcher's grids and ``WORK_UNITS`` both use it."""
    return triton.cdiv(D, block_do(D, dtype))


@torch.library.triton_op("contrastive_ops_triton::siglip_fwd", mutates_args=())
def _siglip_fwd_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    same_device("siglip_fwd", x.device, y=y)
    scale, bias = scalar_on("siglip_fwd", "scale", scale, x.device), scalar_on("siglip_fwd", "bias", bias, x.device)
    B, D = x.shape
    M = y.shape[0]
    part = torch.zeros((triton.cdiv(B, min_block()),), dtype=torch.float32, device=x.device)
    if B > 0 and M > 0:
        launch("siglip_fwd", _siglip_fwd_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),))(
            x, y, scale, bias, part, B, M, D, x.stride(0), y.stride(0), log2_bucket(B), log2_bucket(M),
            BLOCK_D=block_d(D, x.dtype), **dot_flags(x.dtype),
        )
    return part.sum()


@_siglip_fwd_op.register_fake
def _(x, y, scale, bias):
    return x.new_empty((), dtype=torch.float32)


# GEMM backward: G of a block of rows [R0, R1) to memory (rounded to the input dtype, as the dx/dy
# kernels round it before their products), with per-tile partials of dscale and dbias; with
# WANT_LOSS also of the loss (the loss and its gradient in one pass, ``_siglip_fwd_grads_op``).
# Its configs, for every dtype: compiled for sm_90a, 128 × 128 tiles spill 36–48 B with the loss,
# 4-warp tiles beyond 64 × 64 24–36 B; these do not.
G_GPU = [((128, 64), 8, 3), ((64, 128), 8, 3), ((64, 64), 4, 4)]


@autotune(configs(("BLOCK_M", "BLOCK_N"), G_GPU, INTERP_BLOCK), key=["D", "B_LOG2", "M_LOG2", "PREC", "WANT_LOSS"])
@triton.jit
def _siglip_bwd_g_kernel(X, Y, Scale, Bias, Grad, G, ScalePart, BiasPart, LossPart, R0, R1, M, D, stride_x,
                         stride_y, stride_g, B_LOG2, M_LOG2,
                         UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WANT_LOSS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale = tl.load(Scale)
    bias = tl.load(Bias)
    grad = tl.load(Grad)
    rows = R0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R1
    cols, col_mask, y_rows = col_tile(pid_n * BLOCK_N, M, X, BLOCK_N, False)
    part = pid_m * tl.num_programs(1) + pid_n
    if WANT_LOSS:
        g, s_rows, b_rows, l_rows = _siglip_g_loss_tile(X, Y, rows.to(tl.int64), y_rows, rows, cols, row_mask,
                                                        col_mask, D, stride_x, stride_y, scale, bias, grad,
                                                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        tl.store(LossPart + part, tl.sum(l_rows, 0))
    else:
        g, xy = _siglip_g_tile(X, Y, rows.to(tl.int64), y_rows, rows, cols, row_mask, col_mask, D, stride_x,
                               stride_y, scale, bias, grad, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        s_rows, b_rows = tl.sum(g * xy, 1), tl.sum(g, 1)
    tl.store(G + (rows - R0).to(tl.int64)[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
    tl.store(ScalePart + part, tl.sum(s_rows, 0))
    tl.store(BiasPart + part, tl.sum(b_rows, 0))


@triton.jit
def _siglip_g_loss_tile(X, Y, x_rows, y_rows, rows, cols, row_mask, col_mask, D, stride_x, stride_y, scale, bias,
                        grad, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``_siglip_g_tile`` and the loss of the tile in one pass (one exponential a pair for both, as
    ``_sigmoid`` and ``_softplus`` compute them): G and the row sums of G·x·y, G and the loss, so
    that only G stays a 2-D tile."""
    xy = s_tile(X, Y, x_rows, y_rows, row_mask, col_mask, D, stride_x, stride_y, 0, 0,
                BLOCK_M, BLOCK_N, BLOCK_D, False, UPCAST, PREC)
    nz = _neg_z(rows, cols)
    t = nz * (scale * xy + bias)
    ok = row_mask[:, None] & col_mask[None, :]
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    l_rows = tl.sum(tl.where(ok, tl.maximum(t, 0.0) + log1p, 0.0), 1)
    g = tl.where(ok, grad * nz * tl.where(t >= 0, 1.0 / u, e / u), 0.0)
    return g, tl.sum(g * xy, 1), tl.sum(g, 1), l_rows


def _gemm_backward(x, y, scale, bias, grad, want_loss=False, out_dtype=None):
    """SigLIP's GEMM backward (``BACKWARD = "gemm"``): per block of rows, ``_siglip_bwd_g_kernel``
    recomputes the logits once and stores G; cuBLAS does dx = scale·G·Y and accumulates
    dy += Gᵀ·X in fp32 — the dx/dy kernels' 8 units become 2 of recompute plus the two products at
    GEMM speed.  Extra memory: the G block (≤ ``GEMM_G_BYTES``) and an M × D fp32 accumulator.
    ``want_loss``: the same pass also sums the loss, returned first (``siglip_forward_with_grads``);
    ``out_dtype``: the dtype of dx and dy (default: the inputs')."""
    from .products import mm_f32  # noqa: PLC0415 - below the kernels, so their lines stay put

    B, D = x.shape
    M = y.shape[0]
    unit = min_block()
    rows_per = gemm_block_rows(B, M, x.element_size(), GEMM_G_BYTES)
    dx = empty(x.shape, out_dtype or x.dtype, x.device)
    dy_acc = torch.zeros((M, D), dtype=torch.float32, device=x.device)
    gbuf = empty((rows_per, M), x.dtype, x.device)
    flags = dot_flags(x.dtype)
    s_parts, b_parts, l_parts = [], [], []
    for r0 in range(0, B, rows_per):
        r1 = min(B, r0 + rows_per)
        g = gbuf[: r1 - r0]
        n_part = triton.cdiv(r1 - r0, unit) * triton.cdiv(M, unit)
        sp, bp, lp = (torch.zeros((n_part,), dtype=torch.float32, device=x.device) for _ in range(3))
        launch("siglip_bwd_g", _siglip_bwd_g_kernel,
               lambda meta, n=r1 - r0: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_N"])))(
            x, y, scale, bias, grad, g, sp, bp, lp, r0, r1, M, D, x.stride(0), y.stride(0), g.stride(0),
            log2_bucket(B), log2_bucket(M), BLOCK_D=block_d(D, x.dtype), WANT_LOSS=want_loss, **flags,
        )
        dx[r0:r1] = (mm_f32(g, y) * scale).to(dx.dtype)
        dy_acc += mm_f32(g.t(), x[r0:r1])
        s_parts.append(sp.sum())
        b_parts.append(bp.sum())
        l_parts.append(lp.sum())
    out = (dx, (dy_acc * scale).to(out_dtype or y.dtype), torch.stack(s_parts).sum(), torch.stack(b_parts).sum())
    return ((torch.stack(l_parts).sum(),) + out) if want_loss else out


@torch.library.triton_op("contrastive_ops_triton::siglip_bwd", mutates_args=())
def _siglip_bwd_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    same_device("siglip_bwd", x.device, y=y)
    scale, bias = scalar_on("siglip_bwd", "scale", scale, x.device), scalar_on("siglip_bwd", "bias", bias, x.device)
    grad = scalar_on("siglip_bwd", "grad", grad, x.device)
    B, D = x.shape
    M = y.shape[0]
    run = B > 0 and M > 0
    dx = empty(x.shape, x.dtype, x.device) if run else torch.zeros_like(x)
    dy = empty(y.shape, y.dtype, y.device) if run else torch.zeros_like(y)
    n_part = triton.cdiv(B, min_block())
    scale_part = torch.zeros((n_part,), dtype=torch.float32, device=x.device)
    bias_part = torch.zeros((n_part,), dtype=torch.float32, device=x.device)
    bd, bdo = block_d(D, x.dtype), block_do(D, x.dtype)
    n_d = out_chunks(D, x.dtype)
    flags = dot_flags(x.dtype)
    buckets = (log2_bucket(B), log2_bucket(M))
    if backward_path(B, M, D, x.dtype) == "gemm" and run:
        return _gemm_backward(x, y, scale, bias, grad)
    if run:
        launch("siglip_bwd_dx", _siglip_bwd_dx_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_d))(
            x, y, scale, bias, grad, dx, scale_part, bias_part, B, M, D, x.stride(0), y.stride(0), dx.stride(0),
            *buckets, BLOCK_D=bd, BLOCK_DO=bdo, **flags,
        )
        launch("siglip_bwd_dy", _siglip_bwd_dy_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), n_d))(
            x, y, scale, bias, grad, dy, B, M, D, x.stride(0), y.stride(0), dy.stride(0),
            *buckets, BLOCK_D=bd, BLOCK_DO=bdo, **flags,
        )
    return dx, dy, scale_part.sum(), bias_part.sum()


@_siglip_bwd_op.register_fake
def _(x, y, scale, bias, grad):
    return (torch.empty_like(x), torch.empty_like(y), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


@torch.library.triton_op("contrastive_ops_triton::siglip_fwd_grads", mutates_args=())
def _siglip_fwd_grads_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(total, dx, dy, dscale, dbias)`` for an upstream gradient of 1, in one pass of the GEMM
    backward that also sums the loss: SigLIP's gradient needs no statistic of the forward (no LSE),
    so a step that will be differentiated saves the forward's 2 units.  dx and dy in fp32."""
    same_device("siglip_fwd_grads", x.device, y=y)
    scale = scalar_on("siglip_fwd_grads", "scale", scale, x.device)
    bias = scalar_on("siglip_fwd_grads", "bias", bias, x.device)
    if x.shape[0] == 0 or y.shape[0] == 0:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return zero, torch.zeros_like(x, dtype=torch.float32), torch.zeros_like(y, dtype=torch.float32), zero, zero
    one = torch.ones((), dtype=torch.float32, device=x.device)
    return _gemm_backward(x, y, scale, bias, one, want_loss=True, out_dtype=torch.float32)


@_siglip_fwd_grads_op.register_fake
def _(x, y, scale, bias):
    return (x.new_empty((), dtype=torch.float32), torch.empty_like(x, dtype=torch.float32),
            torch.empty_like(y, dtype=torch.float32), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


from .costs import declare_work, gemm_pays  # noqa: E402 - below the kernels, so their lines stay put


def backward_path(B: int, M: int, D: int, dtype: torch.dtype) -> str:
    """``"gemm"`` or ``"deterministic"`` (the dx/dy kernels, also under "atomic"): ``BACKWARD``, with
    "auto" decided by the measured-rate cost model (``costs.gemm_pays``)."""
    path = checked_backward(BACKWARD)
    if path == "auto":
        return "gemm" if gemm_pays(B, M, D, dtype, "siglip") else "deterministic"
    return "gemm" if path == "gemm" else "deterministic"


def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)) as a 0-dim fp32 tensor."""
    return torch.ops.contrastive_ops_triton.siglip_fwd(x, y, scale, bias)


def siglip_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad: Tensor):
    """``(dx like x, dy like y, dscale, dbias)`` (0-dim fp32) for upstream gradient ``grad``."""
    return torch.ops.contrastive_ops_triton.siglip_bwd(x, y, scale, bias, grad)


def _scalar(t: Tensor, device) -> Tensor:
    return torch.as_tensor(t, device=device).to(torch.float32).reshape(()).contiguous()


class _SigLIPPrimitive:
    """The ``"siglip"`` primitive of the Triton backend."""

    @staticmethod
    def forward(x, y, scale, bias):
        return siglip_forward(x.contiguous(), y.contiguous(), _scalar(scale, x.device), _scalar(bias, x.device))

    @staticmethod
    def backward(x, y, scale, bias, grad):
        return siglip_backward(x.contiguous(), y.contiguous(), _scalar(scale, x.device), _scalar(bias, x.device),
                               _scalar(grad, x.device))

    @staticmethod
    def fuses(x, y) -> bool:
        """Whether a differentiated step computes the loss and its gradient in one pass: where the
        backward is the GEMM backward (``backward_path``)."""
        return backward_path(x.shape[0], y.shape[0], x.shape[1], x.dtype) == "gemm"

    @staticmethod
    def forward_with_grads(x, y, scale, bias):
        return torch.ops.contrastive_ops_triton.siglip_fwd_grads(
            x.contiguous(), y.contiguous(), _scalar(scale, x.device), _scalar(bias, x.device))


SIGLIP = _SigLIPPrimitive()


# Variants the sm_90a compile gate measures failing, per Triton minor version (each compiles with
# its own ptxas: the same kernel spills more, less or not at all under another; ``python -m
# contrastive_ops.backends._triton.specs --faults`` under that Triton re-measures its table):
# (kernel, dtype, the D that share the binary, config as ``tiles.spec_config``) -> the measured
# fault.  compile_specs marks the installed Triton's entries ``expect_fail``: the gate's rows are
# xfail(strict=True), red again once a kernel is fixed.
_GATE_FAULTS = {
    "3.6": {
        ("siglip_bwd_dx", "bf16", (256,), "128x64 w8 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dx", "bf16", (256,), "64x64 w4 s2"): "spills 68 B stored / 52 B loaded",
        ("siglip_bwd_dx", "bf16", (512, 768, 1024), "64x64 w8 s2"): "spills 56 B stored / 44 B loaded",
        ("siglip_bwd_dx", "fp16", (256,), "128x64 w8 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dx", "fp16", (256,), "64x64 w4 s2"): "spills 68 B stored / 52 B loaded",
        ("siglip_bwd_dx", "fp16", (512, 768, 1024), "64x64 w8 s2"): "spills 56 B stored / 44 B loaded",
        ("siglip_bwd_dx", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 32 B stored / 16 B loaded",
        ("siglip_bwd_dx", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 144 B stored / 92 B loaded",
        ("siglip_bwd_dy", "bf16", (256,), "64x128 w8 s2"): "spills 44 B stored / 28 B loaded",
        ("siglip_bwd_dy", "bf16", (256,), "64x64 w4 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dy", "fp16", (256,), "64x128 w8 s2"): "spills 44 B stored / 28 B loaded",
        ("siglip_bwd_dy", "fp16", (256,), "64x64 w4 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 48 B stored / 24 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "64x128 w8 s2"): "spills 96 B stored / 64 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 64 B stored / 40 B loaded",
    },
    "3.8": {
        ("siglip_bwd_dx", "bf16", (256,), "128x64 w8 s2"): "spills 72 B stored / 56 B loaded",
        ("siglip_bwd_dx", "bf16", (256,), "64x64 w4 s2"): "spills 80 B stored / 64 B loaded",
        ("siglip_bwd_dx", "fp16", (256,), "128x64 w8 s2"): "spills 72 B stored / 56 B loaded",
        ("siglip_bwd_dx", "fp16", (256,), "64x64 w4 s2"): "spills 148 B stored / 128 B loaded",
        ("siglip_bwd_dx", "fp16", (512, 768, 1024), "64x64 w8 s2"): "spills 40 B stored / 24 B loaded",
        ("siglip_bwd_dx", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 384 B stored / 252 B loaded",
        ("siglip_bwd_dx", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 396 B stored / 256 B loaded",
        ("siglip_bwd_dy", "bf16", (256,), "64x128 w8 s2"): "spills 48 B stored / 32 B loaded",
        ("siglip_bwd_dy", "bf16", (256,), "64x64 w4 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dy", "fp16", (256,), "64x128 w8 s2"): "spills 48 B stored / 32 B loaded",
        ("siglip_bwd_dy", "fp16", (256,), "64x64 w4 s2"): "spills 56 B stored / 40 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "128x64 w8 s2"): "spills 48 B stored / 24 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "64x128 w8 s2"): "spills 108 B stored / 76 B loaded",
        ("siglip_bwd_dy", "fp32", (128, 256, 512, 768, 1024), "64x64 w4 s2"): "spills 56 B stored / 32 B loaded",
    },
}


def compile_specs() -> list:
    """Every (kernel, config, dtype, D) the GPU dispatcher can pick (see ``sim_lse.compile_specs``)."""
    from .tiles import gpu_block_d

    out = []
    for dname in SPEC_DTYPES:
        flags = gpu_dot_flags(dname)
        for D in SPEC_DS:
            bd = gpu_block_d(D, dname == "fp32")
            bdo = gpu_block_do(D, dname)
            for (bm, bn), w, st in gpu_choices(FWD_GPU, dname):
                out.append(spec("siglip_fwd", _siglip_fwd_kernel.fn, dname, D,
                                dict(**flags, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn), w, st))
            for name, kernel, choices in (("siglip_bwd_dx", _siglip_bwd_dx_kernel, BWD_DQ_GPU),
                                          ("siglip_bwd_dy", _siglip_bwd_dy_kernel, BWD_GPU)):
                for (bm, bn), w, st in choices:
                    c = dict(**flags, BLOCK_D=bd, BLOCK_DO=bdo, BLOCK_M=bm, BLOCK_N=bn)
                    if acc_fits(c, w, bdo):
                        out.append(spec(name, kernel.fn, dname, D, c, w, st))
            for (bm, bn), w, st in G_GPU:
                for name, loss in (("siglip_bwd_g", False), ("siglip_g_loss", True)):  # backward; fused step
                    out.append(matrix_writer(spec(name, _siglip_bwd_g_kernel.fn, dname, D,
                                                  dict(**flags, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, WANT_LOSS=loss),
                                                  w, st)))
    from .tiles import mark_known_faults

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/siglip.py")


def bwd_work(D: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int]:
    """``(units, S evaluations per pair)`` of the SigLIP backward on the GPU: the dx (row-stationary)
    and dy (column-stationary) kernels each recompute S per output chunk (``out_chunks``, as the
    launcher) and add their gradient product: 2·(2·n_d + 2), 8 for 16-bit D ≤ 512."""
    n = out_chunks(D, dtype)
    return 2 * (2 * n + 2), 2 * n


def _gpu_work(D: int, dtype_name: str, i: int) -> float:
    from .sim_lse import _gpu_dispatch

    with _gpu_dispatch():
        return bwd_work(D, SPEC_DTYPES[dtype_name])[i]


# Units of B·M·D and S evaluations per pair (benchmarks/perf_model.py); callables take (D, dtype name).
WORK_UNITS = {"siglip_fwd": 2, "siglip_bwd": lambda D, dtype="bf16": _gpu_work(D, dtype, 0),
              "siglip_bwd_gemm": 6}  # G kernel 2, cuBLAS G·Y and Gᵀ·X 2 + 2
S_EVALS = {"siglip_fwd": 1, "siglip_bwd": lambda D, dtype="bf16": _gpu_work(D, dtype, 1), "siglip_bwd_gemm": 1}
declare_work(WORK_UNITS)  # the cost model that chooses the backward (``backward_path``)
