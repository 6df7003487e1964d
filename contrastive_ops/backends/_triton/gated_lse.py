r"""Triton kernels of the ``"gated_lse"`` primitive (maths in ``contrastive_ops.primitives.gated_lse``).

Per tile two products in fp32: G = a·kᵀ and N = w·(k⊙k)ᵀ, then S = scale·G·max(N, eps²)^(-1/2) with
eps² = 1e-24 (the losses' eps 1e-12 of F.normalize, written into the kernels).

* forward, one program per BLOCK_M rows, streaming the columns of the union
  of its rows' ranges (the caller orders rows by range, so a block's union is
  about each row's range): online max and Σ e^{S−max};
* da, dw, one program per BLOCK_M rows over the same columns: P = e^{S − lse}
  recomputed, dS = γ·P, da += (dS·scale·r)·k, dw += dN·(k⊙k), and the row's
  part of dscale;
* dk, one program per BLOCK_N columns, streaming the row blocks whose range
  union meets them: dk += dGᵀ·a + 2·k ⊙ (dNᵀ·w).

No atomics (deterministic); dscale is the ``torch.sum`` of the per-row parts.
Tiles hold all of D (BLOCK_D = next power of two ≥ D, at least 16); keys of
any input dtype are upcast to fp32 in the tile.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import dot_flags, empty, interpreting, launch

Tensor = torch.Tensor
BWD_WARPS = 8  # the backward kernels hold two fp32 (BLOCK, BLOCK_D) accumulators: 4 warps spill at D = 128


@triton.jit
def _tile(X, rows, rmask, offs_d, D, stride):
    return tl.load(X + rows[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _logits(a, w, k, s, PREC: tl.constexpr):
    """(G, N clamped, S) of a tile."""
    g = tl.dot(a, tl.trans(k), input_precision=PREC)
    n = tl.maximum(tl.dot(w, tl.trans(k * k), input_precision=PREC), 1e-24)
    return g, n, g * tl.rsqrt(n) * s


@triton.jit
def _gated_lse_fwd_kernel(A, W, K, Scale, CS, CE, LSE, B, M, D, stride_a, stride_w, stride_k,
                          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    a = _tile(A, rows, rmask, offs_d, D, stride_a)
    w = _tile(W, rows, rmask, offs_d, D, stride_w)
    s = tl.load(Scale)
    cs = tl.load(CS + rows, mask=rmask, other=M)
    ce = tl.load(CE + rows, mask=rmask, other=0)
    lo = tl.min(cs, 0)
    hi = tl.max(ce, 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_l = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _tile(K, cols, cols < M, offs_d, D, stride_k)
        g, n, z = _logits(a, w, k, s, PREC)
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
def _gated_lse_daw_kernel(A, W, K, Scale, CS, CE, LSE, GL, DA, DW, Part, B, M, D, stride_a, stride_w, stride_k,
                          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    a = _tile(A, rows, rmask, offs_d, D, stride_a)
    w = _tile(W, rows, rmask, offs_d, D, stride_w)
    s = tl.load(Scale)
    cs = tl.load(CS + rows, mask=rmask, other=M)
    ce = tl.load(CE + rows, mask=rmask, other=0)
    lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    lo = tl.min(cs, 0)
    hi = tl.max(ce, 0)
    da = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    part = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _tile(K, cols, cols < M, offs_d, D, stride_k)
        g, n, z = _logits(a, w, k, s, PREC)
        ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])
        dg, dn, dsc = _grad_tile(g, n, z, ok, s, lse, gl)
        da = tl.dot(dg, k, da, input_precision=PREC)
        dw = tl.dot(dn, k * k, dw, input_precision=PREC)
        part += tl.sum(dsc, 1)
    out = rmask[:, None] & (offs_d[None, :] < D)
    tl.store(DA + rows[:, None].to(tl.int64) * stride_a + offs_d[None, :], da, mask=out)
    tl.store(DW + rows[:, None].to(tl.int64) * stride_w + offs_d[None, :], dw, mask=out)
    tl.store(Part + rows, part, mask=rmask)


@triton.jit
def _gated_lse_dk_kernel(A, W, K, Scale, CS, CE, LSE, GL, DK, B, M, D, stride_a, stride_w, stride_k, stride_dk,
                         PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    c0 = tl.program_id(0) * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    cmask = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(K, cols, cmask, offs_d, D, stride_k)
    s = tl.load(Scale)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkw = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < B
        cs = tl.load(CS + rows, mask=rmask, other=M)
        ce = tl.load(CE + rows, mask=rmask, other=0)
        if (tl.min(cs, 0) < c0 + BLOCK_N) & (tl.max(ce, 0) > c0):  # the block's ranges meet these columns
            a = _tile(A, rows, rmask, offs_d, D, stride_a)
            w = _tile(W, rows, rmask, offs_d, D, stride_w)
            lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
            gl = tl.load(GL + rows, mask=rmask, other=0.0)
            g, n, z = _logits(a, w, k, s, PREC)
            ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None]) & cmask[None, :]
            dg, dn, dsc = _grad_tile(g, n, z, ok, s, lse, gl)
            dk = tl.dot(tl.trans(dg), a, dk, input_precision=PREC)
            dkw = tl.dot(tl.trans(dn), w, dkw, input_precision=PREC)
    dk += 2.0 * k * dkw
    tl.store(DK + cols[:, None].to(tl.int64) * stride_dk + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=cmask[:, None] & (offs_d[None, :] < D))


def _blocks(D: int, kernel: str = "fwd") -> dict:
    """Tile sizes; on a GPU the backward kernels stream half-width tiles (the other side of each product
    keeps 64 rows, wgmma's M): two fp32 accumulators of (64, BLOCK_D) fill the registers."""
    bd = max(16, triton.next_power_of_2(D))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=bd)
    wide = 64 if bd <= 128 else 32
    if kernel == "daw":
        return dict(BLOCK_M=64, BLOCK_N=wide // 2, BLOCK_D=bd)
    if kernel == "dk":
        return dict(BLOCK_M=wide // 2, BLOCK_N=64, BLOCK_D=bd)
    return dict(BLOCK_M=64, BLOCK_N=wide, BLOCK_D=bd)


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
        launch("gated_lse_daw", _gated_lse_daw_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            a, w, k, scale, col_start, col_end, lse, grad_lse, da, dw, part, B, M, D, a.stride(0), w.stride(0),
            k.stride(0), **f)
    if M > 0:
        f = _flags(D, "dk")
        launch("gated_lse_dk", _gated_lse_dk_kernel, (triton.cdiv(M, f["BLOCK_N"]),))(
            a, w, k, scale, col_start, col_end, lse, grad_lse, dk, B, M, D, a.stride(0), w.stride(0),
            k.stride(0), dk.stride(0), **f)
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
    c = dict(PREC="tf32x3", BLOCK_M=64, BLOCK_N=64 if bd <= 128 else 32, BLOCK_D=bd)
    c_daw = dict(c, BLOCK_N=c["BLOCK_N"] // 2)
    c_dk = dict(c, BLOCK_M=c["BLOCK_N"] // 2)
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        common = dict(A="*fp32", W="*fp32", K=t, Scale="*fp32", CS="*i32", CE="*i32")
        dims = dict(B="i32", M="i32", D="i32", stride_a="i32", stride_w="i32", stride_k="i32")
        out.append(dict(name="gated_lse_fwd", fn=_gated_lse_fwd_kernel, args=dict(common, LSE="*fp32", **dims),
                        constexprs=c, num_warps=4, num_stages=2, dtype=dtype, D=D))
        out.append(dict(name="gated_lse_daw", fn=_gated_lse_daw_kernel,
                        args=dict(common, LSE="*fp32", GL="*fp32", DA="*fp32", DW="*fp32", Part="*fp32", **dims),
                        constexprs=c_daw, num_warps=BWD_WARPS, num_stages=2, dtype=dtype, D=D))
        out.append(dict(name="gated_lse_dk", fn=_gated_lse_dk_kernel,
                        args=dict(common, LSE="*fp32", GL="*fp32", DK=t, **dims, stride_dk="i32"),
                        constexprs=c_dk, num_warps=BWD_WARPS, num_stages=2, dtype=dtype, D=D))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/gated_lse.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
        ("gated_lse_daw", "bf16", (128,), "64x32 w8 s2"): "spills 392 B stored / 376 B loaded",
        ("gated_lse_daw", "fp16", (128,), "64x32 w8 s2"): "spills 392 B stored / 376 B loaded",
        ("gated_lse_daw", "fp32", (128,), "64x32 w8 s2"): "spills 396 B stored / 380 B loaded",
        ("gated_lse_dk", "bf16", (128,), "32x64 w8 s2"):
            "spills 1436 B stored / 1256 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("gated_lse_dk", "fp16", (128,), "32x64 w8 s2"):
            "spills 1436 B stored / 1256 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("gated_lse_dk", "fp32", (128,), "32x64 w8 s2"):
            "spills 1744 B stored / 1592 B loaded; streaming loop without cp.async or TMA (not pipelined)",
    },
    "3.8": {
        ("gated_lse_daw", "bf16", (128,), "64x32 w8 s2"): "spills 1088 B stored / 1224 B loaded",
        ("gated_lse_daw", "fp16", (128,), "64x32 w8 s2"): "spills 1124 B stored / 1288 B loaded",
        ("gated_lse_daw", "fp32", (128,), "64x32 w8 s2"): "spills 1148 B stored / 1312 B loaded",
        ("gated_lse_dk", "bf16", (128,), "32x64 w8 s2"):
            "spills 2200 B stored / 2172 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("gated_lse_dk", "fp16", (128,), "32x64 w8 s2"):
            "spills 2356 B stored / 2192 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("gated_lse_dk", "fp32", (128,), "32x64 w8 s2"):
            "spills 2516 B stored / 2576 B loaded; streaming loop without cp.async or TMA (not pipelined)",
        ("gated_lse_fwd", "fp16", (128,), "64x64 w4 s2"): "spills 8 B stored / 8 B loaded",
    },
}
