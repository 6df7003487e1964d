r"""Triton kernels of the ``"sim_expect"`` primitive (maths in ``contrastive_ops.primitives.sim_expect``).

G = q·kᵀ (fp32 accumulation), S = scale·G, one excluded candidate per row at most.

* forward, one program per BLOCK_M rows, streaming BLOCK_N candidates: an
  online max m, l = Σ e^{S−m} and t = Σ e^{S−m}·G (both rescaled when m grows)
  give lse = m + log l and mean = t / l;
* dq, one program per BLOCK_M rows: P = e^{S − lse} recomputed,
  dG = P·(scale·g_lse + g_mean·(1 + scale·(G − mean))), dq += dG·k, and the
  row's part of dscale, g_lse·mean + g_mean·Σ_j P·G·(G − mean);
* dk, one program per BLOCK_N candidates, streaming the rows: dk += dGᵀ·q.

No atomics (deterministic); dscale is the ``torch.sum`` of the per-row parts.
Gradient tiles hold all of D (BLOCK_D = next power of two ≥ D, at least 16).
G is formed by one helper, ``tiles.g_tile``, the same way in all three kernels:
from held full-D tiles in 16-bit, from BLOCK_DS-wide chunks in fp32 (tf32x3
keeps split copies of its operands in registers: a held 64 × 128 fp32 tile
spills 2 KB per thread on sm_90a).  Not tuned otherwise.
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
def _rows_tile(Q, rows, rmask, offs_d, D, stride_q, UPCAST: tl.constexpr):
    t = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + offs_d[None, :],
                mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _sim_expect_fwd_kernel(Q, K, Scale, Excl, LSE, MEAN, B, M, D, stride_q, stride_k,
                           HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = held_tile(Q, rows.to(tl.int64), rmask, offs_d, D, stride_q, UPCAST, BLOCK_DS == BLOCK_D)
    s = tl.load(Scale)
    if HAS_EXCL:
        ex = tl.load(Excl + rows, mask=rmask, other=-1)
    else:
        ex = tl.full([BLOCK_M], -1, tl.int32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DS)
        ok = cmask[None, :] & (cols[None, :] != ex[:, None])
        z = tl.where(ok, g * s, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no candidate yet
        corr = tl.exp(m - shift)
        p = tl.exp(z - shift[:, None])
        acc_l = acc_l * corr + tl.sum(p, 1)
        t = t * corr + tl.sum(p * tl.where(ok, g, 0.0), 1)
        m = m_new
    has = acc_l > 0
    l_safe = tl.where(has, acc_l, 1.0)
    tl.store(LSE + rows, tl.where(has, m + tl.log(l_safe), float("-inf")), mask=rmask)
    tl.store(MEAN + rows, tl.where(has, t / l_safe, 0.0), mask=rmask)


@triton.jit
def _dg_tile(g, ok, s, lse, mean, gl, gm):
    """(P, dG) of a tile from the row statistics; rows with nothing allowed (lse = −inf) give 0."""
    has = lse > float("-inf")
    lse_safe = tl.where(has, lse, 0.0)
    p = tl.where(ok & has[:, None], tl.exp(g * s - lse_safe[:, None]), 0.0)
    dg = p * (s * gl[:, None] + gm[:, None] * (1.0 + s * (g - mean[:, None])))
    return p, dg


@triton.jit
def _sim_expect_dq_kernel(Q, K, Scale, Excl, LSE, MEAN, GL, GM, DQ, Part, B, M, D, stride_q, stride_k, stride_dq,
                          HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = held_tile(Q, rows.to(tl.int64), rmask, offs_d, D, stride_q, UPCAST, BLOCK_DS == BLOCK_D)
    s = tl.load(Scale)
    lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    gm = tl.load(GM + rows, mask=rmask, other=0.0)
    if HAS_EXCL:
        ex = tl.load(Excl + rows, mask=rmask, other=-1)
    else:
        ex = tl.full([BLOCK_M], -1, tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    var = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        k = _rows_tile(K, cols, cmask, offs_d, D, stride_k, UPCAST)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DS)
        ok = cmask[None, :] & (cols[None, :] != ex[:, None])
        p, dg = _dg_tile(g, ok, s, lse, mean, gl, gm)
        var += tl.sum(p * g * (g - mean[:, None]), 1)
        acc = tl.dot(dg.to(k.dtype), k, acc, input_precision=PREC)
    tl.store(DQ + rows[:, None].to(tl.int64) * stride_dq + offs_d[None, :], acc.to(DQ.dtype.element_ty),
             mask=rmask[:, None] & (offs_d[None, :] < D))
    tl.store(Part + rows, tl.where(rmask, gl * mean + gm * var, 0.0), mask=rmask)


@triton.jit
def _sim_expect_dk_kernel(Q, K, Scale, Excl, LSE, MEAN, GL, GM, DK, B, M, D, stride_q, stride_k, stride_dk,
                          HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)
    s = tl.load(Scale)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < B
        q = _rows_tile(Q, rows, rmask, offs_d, D, stride_q, UPCAST)
        lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        gl = tl.load(GL + rows, mask=rmask, other=0.0)
        gm = tl.load(GM + rows, mask=rmask, other=0.0)
        if HAS_EXCL:
            ex = tl.load(Excl + rows, mask=rmask, other=-1)
        else:
            ex = tl.full([BLOCK_M], -1, tl.int32)
        g = g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST, PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DS)
        ok = cmask[None, :] & rmask[:, None] & (cols[None, :] != ex[:, None])
        p, dg = _dg_tile(g, ok, s, lse, mean, gl, gm)
        acc = tl.dot(tl.trans(dg.to(q.dtype)), q, acc, input_precision=PREC)
    tl.store(DK + cols[:, None].to(tl.int64) * stride_dk + offs_d[None, :], acc.to(DK.dtype.element_ty),
             mask=cmask[:, None] & (offs_d[None, :] < D))


def _blocks(D: int, dtype: str = "bf16", interp: Optional[bool] = None) -> dict:
    """Tile sizes: 16 × 16 under the interpreter, 64 × 64 (64 × 32 past D = 128) on the GPU; G from
    16-wide chunks in fp32 (both modes, so the interpreter runs the chunked path too)."""
    bd = max(16, triton.next_power_of_2(D))
    ds = 16 if dtype == "fp32" else bd
    if interpreting() if interp is None else interp:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=bd, BLOCK_DS=ds)
    return dict(BLOCK_M=64, BLOCK_N=64 if bd <= 128 else 32, BLOCK_D=bd, BLOCK_DS=ds)


def _warps(dtype: str) -> int:
    """4 warps; 8 in fp32, whose gradient kernels spill 100–500 B per thread on 4 (sm_90a, D = 128)."""
    return 8 if dtype == "fp32" else 4


def _flags(q: Tensor, exclude: Optional[Tensor]) -> dict:
    dtype = "fp32" if q.dtype == torch.float32 else "bf16"
    return dict(HAS_EXCL=exclude is not None, **dot_flags(q.dtype), **_blocks(q.shape[1], dtype),
                num_warps=_warps(dtype))


@torch.library.triton_op("contrastive_ops_triton::sim_expect_fwd", mutates_args=())
def _sim_expect_fwd_op(q: Tensor, k: Tensor, scale: Tensor, exclude: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    same_device("sim_expect_fwd", q.device, k=k, exclude=exclude)
    scale = scalar_on("sim_expect_fwd", "scale", scale, q.device)
    B, D = q.shape
    M = k.shape[0]
    lse = empty((B,), torch.float32, q.device)
    mean = empty((B,), torch.float32, q.device)
    if B > 0:
        f = _flags(q, exclude)
        launch("sim_expect_fwd", _sim_expect_fwd_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            q, k, scale, q if exclude is None else exclude, lse, mean, B, M, D, q.stride(0), k.stride(0), **f)
    return lse, mean


@_sim_expect_fwd_op.register_fake
def _(q, k, scale, exclude):
    return q.new_empty((q.shape[0],), dtype=torch.float32), q.new_empty((q.shape[0],), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sim_expect_bwd", mutates_args=())
def _sim_expect_bwd_op(q: Tensor, k: Tensor, scale: Tensor, exclude: Optional[Tensor], lse: Tensor, mean: Tensor,
                       grad_lse: Tensor, grad_mean: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    same_device("sim_expect_bwd", q.device, k=k, exclude=exclude, lse=lse, mean=mean, grad_lse=grad_lse,
                grad_mean=grad_mean)
    scale = scalar_on("sim_expect_bwd", "scale", scale, q.device)
    B, D = q.shape
    M = k.shape[0]
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    part = empty((B,), torch.float32, q.device)
    f = _flags(q, exclude)
    ex = q if exclude is None else exclude
    if B > 0:
        launch("sim_expect_dq", _sim_expect_dq_kernel, (triton.cdiv(B, f["BLOCK_M"]),))(
            q, k, scale, ex, lse, mean, grad_lse, grad_mean, dq, part, B, M, D, q.stride(0), k.stride(0),
            dq.stride(0), **f)
    if M > 0:
        launch("sim_expect_dk", _sim_expect_dk_kernel, (triton.cdiv(M, f["BLOCK_N"]),))(
            q, k, scale, ex, lse, mean, grad_lse, grad_mean, dk, B, M, D, q.stride(0), k.stride(0),
            dk.stride(0), **f)
    return dq, dk, part.sum()


@_sim_expect_bwd_op.register_fake
def _(q, k, scale, exclude, lse, mean, grad_lse, grad_mean):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def _f32(v: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(v, device=like.device).to(torch.float32).reshape(()).contiguous()


def _check(q: Tensor, k: Tensor) -> None:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1] or q.dtype != k.dtype:
        raise ValueError(f"sim_expect: q and k must be 2-D of one feature size and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)} {k.dtype}")


class _SimExpect:
    """The ``"sim_expect"`` primitive of the Triton backend (contract in ``primitives/sim_expect.py``)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, scale: Tensor, exclude: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        _check(q, k)
        return torch.ops.contrastive_ops_triton.sim_expect_fwd(q.contiguous(), k.contiguous(), _f32(scale, q),
                                                               exclude)

    @staticmethod
    def backward(q, k, scale, exclude, lse, mean, grad_lse, grad_mean) -> Tuple[Tensor, Tensor, Tensor]:
        _check(q, k)
        return torch.ops.contrastive_ops_triton.sim_expect_bwd(
            q.contiguous(), k.contiguous(), _f32(scale, q), exclude, lse.contiguous(), mean.contiguous(),
            grad_lse.to(torch.float32).contiguous(), grad_mean.to(torch.float32).contiguous())


SIM_EXPECT = _SimExpect()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): forward, dq and dk in every
    input dtype, with and without an exclude list, at D = 128 (CACR's feature size in the official
    small-scale runs) on the GPU block sizes."""
    out = []
    D = 128
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        for has_excl in (True, False):
            prec = "tf32x3" if dtype == "fp32" else "tf32"
            c = dict(HAS_EXCL=has_excl, UPCAST=False, PREC=prec, **_blocks(D, dtype, interp=False))
            common = dict(Q=t, K=t, Scale="*fp32", Excl="*i32" if has_excl else t, LSE="*fp32", MEAN="*fp32")
            x = "_x" if has_excl else ""  # a distinct name per variant: the gate's fault tables key by name
            out.append(dict(name="sim_expect_fwd" + x, fn=_sim_expect_fwd_kernel,
                            args=dict(common, B="i32", M="i32", D="i32", stride_q="i32", stride_k="i32"),
                            constexprs=c, num_warps=_warps(dtype), num_stages=2, dtype=dtype, D=D))
            out.append(dict(name="sim_expect_dq" + x, fn=_sim_expect_dq_kernel,
                            args=dict(common, GL="*fp32", GM="*fp32", DQ=t, Part="*fp32", B="i32", M="i32", D="i32",
                                      stride_q="i32", stride_k="i32", stride_dq="i32"),
                            constexprs=c, num_warps=_warps(dtype), num_stages=2, dtype=dtype, D=D))
            out.append(dict(name="sim_expect_dk" + x, fn=_sim_expect_dk_kernel,
                            args=dict(common, GL="*fp32", GM="*fp32", DK=t, B="i32", M="i32", D="i32",
                                      stride_q="i32", stride_k="i32", stride_dk="i32"),
                            constexprs=c, num_warps=_warps(dtype), num_stages=2, dtype=dtype, D=D))
    from .tiles import mark_known_faults  # here, below the kernels: their line numbers key the gate's cache

    return mark_known_faults(out, _GATE_FAULTS, "backends/_triton/sim_expect.py")


# The sm_90a compile gate's measured faults per Triton minor version (``specs --faults``; see
# ``tiles.mark_known_faults``): kept below the kernels so that editing it leaves their cache keys alone.
_GATE_FAULTS = {
    "3.6": {
    },
    "3.8": {
    },
}
