r"""Triton kernels of the ``"gated_lse"`` primitive (maths in ``contrastive_ops.primitives.gated_lse``).

Per tile two products in fp32: G = a·kᵀ and N = w·(k⊙k)ᵀ, then S = scale·G·max(N, eps²)^(-1/2) with
eps² = 1e-24 (the losses' eps 1e-12 of F.normalize, written into the kernels).

* forward, one program per BLOCK_M rows, streaming the columns of the union
  of its rows' ranges (the caller orders rows by range, so a block's union is
  about each row's range): online max and Σ e^{S−max};
* da, dw, one program per BLOCK_M rows over the same columns, one launch per
  gradient: P = e^{S − lse} recomputed, dS = γ·P, da += (dS·scale·r)·k and the
  row's part of dscale, or dw += dN·(k⊙k);
* dk, one program per BLOCK_N columns, streaming the row blocks whose range
  union meets them, in two launches: dNᵀ·w to an fp32 buffer, then
  dk = dGᵀ·a + 2·k ⊙ (dNᵀ·w).

No atomics (deterministic); dscale is the ``torch.sum`` of the per-row parts.
Gradient tiles hold all of D (BLOCK_D = next power of two ≥ D, at least 16);
keys of any input dtype are upcast to fp32 in the tile.  G and N are formed
by one helper, ``_logits``, the same way in all three kernels: summed over
BLOCK_DS-wide D chunks read from memory (held full-D fp32 operands, split
three ways by tf32x3, spilled 0.4–5 KB per thread on sm_90a at D = 128).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import dot_flags, empty, interpreting, launch

Tensor = torch.Tensor
BWD_WARPS = 8  # the backward kernels hold an fp32 (BLOCK, BLOCK_D) accumulator beside tf32x3 operands


@triton.jit
def _tile(X, rows, rmask, offs_d, D, stride):
    return tl.load(X + rows[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _logits(A, W, K, rows, rmask, cols, cmask, s, D, stride_a, stride_w, stride_k, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr):
    """(G, N clamped, S) of a tile: G = a·kᵀ and N = w·(k⊙k)ᵀ summed over BLOCK_DS-wide chunks of D
    read from memory in increasing order (the one way every kernel forms them)."""
    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offs = tl.arange(0, BLOCK_DS)
    for d0 in range(0, D, BLOCK_DS):
        kc = _tile(K, cols, cmask, d0 + offs, D, stride_k)
        g = tl.dot(_tile(A, rows, rmask, d0 + offs, D, stride_a), tl.trans(kc), g, input_precision=PREC)
        n = tl.dot(_tile(W, rows, rmask, d0 + offs, D, stride_w), tl.trans(kc * kc), n, input_precision=PREC)
    n = tl.maximum(n, 1e-24)
    return g, n, g * tl.rsqrt(n) * s


@triton.jit
def _gated_lse_fwd_kernel(A, W, K, Scale, CS, CE, LSE, B, M, D, stride_a, stride_w, stride_k,
                          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    s = tl.load(Scale)
    cs = tl.load(CS + rows, mask=rmask, other=M)
    ce = tl.load(CE + rows, mask=rmask, other=0)
    lo = tl.min(cs, 0)
    hi = tl.max(ce, 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_l = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        g, n, z = _logits(A, W, K, rows, rmask, cols, cols < M, s, D, stride_a, stride_w, stride_k, PREC,
                          BLOCK_M, BLOCK_N, BLOCK_DS)
        ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no candidate yet
        acc_l = acc_l * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    has = acc_l > 0
    tl.store(LSE + rows, tl.where(has, m + tl.log(tl.where(has, acc_l, 1.0)), float("-inf")), mask=rmask)


@triton.jit
def _grad_tile(g, n, z, ok, s, lse, gl):
    """(dG, dN, dS·G·r) of a tile; rows with an empty range (lse = −inf) give 0."""
    has = lse > float("-inf")
    p = tl.where(ok & has[:, None], tl.exp(z - tl.where(has, lse, 0.0)[:, None]), 0.0)
    ds = gl[:, None] * p
    r = tl.rsqrt(n)
    dn = tl.where(n > 1e-24, -0.5 * ds * z / n, 0.0)
    return ds * s * r, dn, ds * g * r


@triton.jit
def _gated_lse_daw_kernel(A, W, K, Scale, CS, CE, LSE, GL, Out, Part, B, M, D, stride_a, stride_w, stride_k, stride_o,
                          PREC: tl.constexpr, DW_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr):
    """One gradient per launch (two fp32 (64, BLOCK_D) accumulators beside tf32x3 operands spill on
    sm_90a): da += dG·k and the rows' parts of dscale, or (``DW_PASS``) dw += dN·(k⊙k)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.load(Scale)
    cs = tl.load(CS + rows, mask=rmask, other=M)
    ce = tl.load(CE + rows, mask=rmask, other=0)
    lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    lo = tl.min(cs, 0)
    hi = tl.max(ce, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    part = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _tile(K, cols, cols < M, offs_d, D, stride_k)
        g, n, z = _logits(A, W, K, rows, rmask, cols, cols < M, s, D, stride_a, stride_w, stride_k, PREC,
                          BLOCK_M, BLOCK_N, BLOCK_DS)
        ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])
        dg, dn, dsc = _grad_tile(g, n, z, ok, s, lse, gl)
        if DW_PASS:
            acc = tl.dot(dn, k * k, acc, input_precision=PREC)
        else:
            acc = tl.dot(dg, k, acc, input_precision=PREC)
            part += tl.sum(dsc, 1)
    tl.store(Out + rows[:, None].to(tl.int64) * stride_o + offs_d[None, :], acc,
             mask=rmask[:, None] & (offs_d[None, :] < D))
    if not DW_PASS:
        tl.store(Part + rows, part, mask=rmask)


@triton.jit
def _gated_lse_dk_kernel(A, W, K, Scale, CS, CE, LSE, GL, DK, Tmp, B, M, D, stride_a, stride_w, stride_k, stride_dk,
                         PREC: tl.constexpr, DKW_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr):
    """Two launches, one accumulator each (as the da/dw kernel): ``DKW_PASS`` stores dNᵀ·w to the fp32
    (M, D) buffer ``Tmp``; the other pass adds dGᵀ·a and 2·k⊙Tmp and stores dk."""
    c0 = tl.program_id(0) * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    cmask = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.load(Scale)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < B
        cs = tl.load(CS + rows, mask=rmask, other=M)
        ce = tl.load(CE + rows, mask=rmask, other=0)
        if (tl.min(cs, 0) < c0 + BLOCK_N) & (tl.max(ce, 0) > c0):  # the block's ranges meet these columns
            lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
            gl = tl.load(GL + rows, mask=rmask, other=0.0)
            g, n, z = _logits(A, W, K, rows, rmask, cols, cmask, s, D, stride_a, stride_w, stride_k, PREC,
                              BLOCK_M, BLOCK_N, BLOCK_DS)
            ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None]) & cmask[None, :]
            dg, dn, dsc = _grad_tile(g, n, z, ok, s, lse, gl)
            if DKW_PASS:
                acc = tl.dot(tl.trans(dn), _tile(W, rows, rmask, offs_d, D, stride_w), acc, input_precision=PREC)
            else:
                acc = tl.dot(tl.trans(dg), _tile(A, rows, rmask, offs_d, D, stride_a), acc, input_precision=PREC)
    out = cmask[:, None] & (offs_d[None, :] < D)
    tmp = Tmp + cols[:, None].to(tl.int64) * D + offs_d[None, :]
    if DKW_PASS:
        tl.store(tmp, acc, mask=out)
    else:
        acc += 2.0 * _tile(K, cols, cmask, offs_d, D, stride_k) * tl.load(tmp, mask=out, other=0.0)
        tl.store(DK + cols[:, None].to(tl.int64) * stride_dk + offs_d[None, :], acc.to(DK.dtype.element_ty), mask=out)


def _blocks(D: int, kernel: str = "fwd") -> dict:
    """Tile sizes; on a GPU every G and N tile has 64 rows (wgmma, as in the forward) and the backward
    kernels hold 32 columns beside their fp32 accumulator (the dk kernel's (32, BLOCK_D) accumulator
    makes its gradient products mma.sync); G and N from 16-wide D chunks."""
    bd = max(16, triton.next_power_of_2(D))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=bd, BLOCK_DS=16)
    wide = 64 if bd <= 128 else 32
    return dict(BLOCK_M=64, BLOCK_N=wide if kernel == "fwd" else wide // 2, BLOCK_D=bd, BLOCK_DS=16)


def _flags(D: int, kernel: str = "fwd") -> dict:
    warps = {} if interpreting() else dict(num_warps=4 if kernel == "fwd" else BWD_WARPS, num_stages=2)
    return dict(PREC=dot_flags(torch.float32)["PREC"], **_blocks(D, kernel), **warps)


@torch.library.triton_op("contrastive_ops_triton::gated_lse_fwd", mutates_args=())
def _gated_lse_fwd_op(a: Tensor, w: Tensor, k: Tensor, scale: Tensor, col_start: Tensor, col_end: Tensor
                      ) -> Tensor:
    same_device("gated_lse_fwd", a.device, w=w, k=k, col_start=col_start, col_end=col_end)
    scale = scalar_on("gated_lse_fwd", "scale", scale, a.device)
    B, D = a.shape
    M = k.shape[0]
    lse = empty((B,), torch.float32, a.device)
    if B > 0:
        f = _flags(D)
        launch("gated_lse_fwd", _gated_lse_fwd_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            a, w, k, scale, col_start, col_end, lse, B, M, D, a.stride(0), w.stride(0), k.stride(0), **f)
    return lse


@_gated_lse_fwd_op.register_fake
def _(a, w, k, scale, col_start, col_end):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::gated_lse_bwd", mutates_args=())
def _gated_lse_bwd_op(a: Tensor, w: Tensor, k: Tensor, scale: Tensor, col_start: Tensor, col_end: Tensor,
                      lse: Tensor, grad_lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    same_device("gated_lse_bwd", a.device, w=w, k=k, col_start=col_start, col_end=col_end, lse=lse,
                grad_lse=grad_lse)
    scale = scalar_on("gated_lse_bwd", "scale", scale, a.device)
    B, D = a.shape
    M = k.shape[0]
    da = empty(a.shape, torch.float32, a.device)
    dw = empty(w.shape, torch.float32, a.device)
    dk = empty(k.shape, k.dtype, k.device)
    part = empty((B,), torch.float32, a.device)
    if B > 0:
        f = _flags(D, "daw")
        for out, dw_pass in ((da, False), (dw, True)):
            launch("gated_lse_daw", _gated_lse_daw_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
                a, w, k, scale, col_start, col_end, lse, grad_lse, out, part, B, M, D, a.stride(0), w.stride(0),
                k.stride(0), out.stride(0), DW_PASS=dw_pass, **f)
    if M > 0:
        f = _flags(D, "dk")
        tmp = empty((M, D), torch.float32, k.device)
        for dkw_pass in (True, False):
            launch("gated_lse_dk", _gated_lse_dk_kernel, (triton.cdiv(M, f["BLOCK_N"]),))(
                a, w, k, scale, col_start, col_end, lse, grad_lse, dk, tmp, B, M, D, a.stride(0), w.stride(0),
                k.stride(0), dk.stride(0), DKW_PASS=dkw_pass, **f)
    return da, dw, dk, part.sum()


@_gated_lse_bwd_op.register_fake
def _(a, w, k, scale, col_start, col_end, lse, grad_lse):
    return (torch.empty_like(a, dtype=torch.float32), torch.empty_like(w, dtype=torch.float32), torch.empty_like(k),
            a.new_empty((), dtype=torch.float32))


def _f32(v: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(v, device=like.device).to(torch.float32).reshape(()).contiguous()


def _check(a: Tensor, w: Tensor, k: Tensor) -> None:
    if a.dtype != torch.float32 or w.dtype != torch.float32:
        raise ValueError(f"gated_lse: a and w must be float32, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.shape != a.shape or k.dim() != 2 or k.shape[1] != a.shape[1]:
        raise ValueError(f"gated_lse: a and w must be (B, D) and k (M, D), got {tuple(a.shape)}, "
                         f"{tuple(w.shape)} and {tuple(k.shape)}")


class _GatedLSE:
    """The ``"gated_lse"`` primitive of the Triton backend (contract in ``primitives/gated_lse.py``)."""

    @staticmethod
    def forward(a, w, k, scale, col_start, col_end) -> Tensor:
        _check(a, w, k)
        return torch.ops.contrastive_ops_triton.gated_lse_fwd(a.contiguous(), w.contiguous(), k.contiguous(),
                                                              _f32(scale, a), col_start.to(torch.int32),
                                                              col_end.to(torch.int32))

    @staticmethod
    def backward(a, w, k, scale, col_start, col_end, lse, grad_lse) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        _check(a, w, k)
        return torch.ops.contrastive_ops_triton.gated_lse_bwd(
            a.contiguous(), w.contiguous(), k.contiguous(), _f32(scale, a), col_start.to(torch.int32),
            col_end.to(torch.int32), lse.contiguous(), grad_lse.to(torch.float32).contiguous())


GATED_LSE = _GatedLSE()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): forward, da/dw and dk for keys
    in every input dtype (a and w are fp32) at D = 128 on the GPU block sizes."""
    out = []
    D = 128
    bd = max(16, triton.next_power_of_2(D))
    c = dict(PREC="tf32x3", BLOCK_M=64, BLOCK_N=64 if bd <= 128 else 32, BLOCK_D=bd, BLOCK_DS=16)
    c_daw = dict(c, BLOCK_N=c["BLOCK_N"] // 2)
    c_dk = dict(c, BLOCK_N=c["BLOCK_N"] // 2)
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        common = dict(A="*fp32", W="*fp32", K=t, Scale="*fp32", CS="*i32", CE="*i32")
        dims = dict(B="i32", M="i32", D="i32", stride_a="i32", stride_w="i32", stride_k="i32")
        out.append(dict(name="gated_lse_fwd", fn=_gated_lse_fwd_kernel, args=dict(common, LSE="*fp32", **dims),
                        constexprs=c, num_warps=4, num_stages=2, dtype=dtype, D=D))
        for name, dw_pass in (("gated_lse_da", False), ("gated_lse_dw", True)):
            out.append(dict(name=name, fn=_gated_lse_daw_kernel,
                            args=dict(common, LSE="*fp32", GL="*fp32", Out="*fp32", Part="*fp32", **dims,
                                      stride_o="i32"),
                            constexprs=dict(c_daw, DW_PASS=dw_pass), num_warps=BWD_WARPS, num_stages=2, dtype=dtype,
                            D=D))
        for name, dkw_pass in (("gated_lse_dkw", True), ("gated_lse_dk", False)):
            out.append(dict(name=name, fn=_gated_lse_dk_kernel,
                            args=dict(common, LSE="*fp32", GL="*fp32", DK=t, Tmp="*fp32", **dims, stride_dk="i32"),
                            constexprs=dict(c_dk, DKW_PASS=dkw_pass), num_warps=BWD_WARPS, num_stages=2, dtype=dtype,
                            D=D))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/gated_lse.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
    },
    "3.8": {
    },
}
