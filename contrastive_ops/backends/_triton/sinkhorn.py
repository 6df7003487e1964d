r"""Triton kernels of the ``"sinkhorn"`` primitive (log-domain Sinkhorn-Knopp scalings).

Maths (see ``contrastive_ops.losses.swav``): with L = S/ε and log-scalings
u (B,), v (K,), one Sinkhorn iteration is::

    u[b] = −LSE_k(L[b,k] + v[k])        sample step   (row LSE)
    v[k] = −LSE_b(L[b,k] + u[b])        prototype step (column LSE)

Two kernels per iteration, one pass over S each:

* ``_sinkhorn_row_lse_kernel`` (skipped on the first iteration, where u = 0):
  one program per block of BLOCK_B rows streams its rows once (online max /
  sum of exp) and writes u (B,) fp32;
* ``_sinkhorn_col_lse_kernel``: program (c, g) owns the column block c of
  BLOCK_K columns and the row blocks g, g + G, g + 2G, …; it folds their
  column max / sum of exp of L + u in registers,

      m' = max(m, m_t),   s' = s·e^{m−m'} + Σ_rows e^{x − m'},

  and writes its (m, s) to its own entries of the (G, K) partial buffers once,
  at the end.  No buffer entry is read back by the kernel that writes it, so
  correctness does not depend on any ordering between the program's threads
  (an earlier one-kernel form read and rewrote its partials across row blocks
  and was only correct because a reduction happened to emit ``bar.sync``);
  u crosses a kernel boundary.

The G partials are combined by torch as LSE_g(m_g + log s_g) (K values each).
``_sinkhorn_codes_kernel`` writes exp(L + v − LSE_k(L + v)) (or exp(L + v)
without normalization).  Every exponent is ≤ 0, so nothing overflows for any
finite input; scores are read in their dtype (fp32, fp16, bf16) and upcast to
fp32.  Apart from the (B, K) output, memory is O(G·K + B).

The launches are ``torch.library.triton_op``s (``contrastive_ops_triton::
sinkhorn_col_lse``, ``sinkhorn_codes``, ``sinkhorn_codes_out``) with fake
kernels, so ``torch.compile`` traces into them and ``opcheck`` covers them.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .args import same_device
from .tiles import wrap

Tensor = torch.Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_lse(S, V, rows, rmask, offs_k, K, stride_b, inv_eps, HAS_V: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """LSE_k(S[b,k]·inv_eps + v[k]) for a block of rows (finite garbage for masked rows)."""
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    row_ptr = S + rows.to(tl.int64)[:, None] * stride_b
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        cmask = cols < K
        x = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = x * inv_eps
        if HAS_V:
            x = x + tl.load(V + cols, mask=cmask, other=0.0)[None, :]
        x = tl.where(cmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log(s)


# B and the row-block count only bound masks and loops: not specialized (one binary for every batch size).
@triton.jit(do_not_specialize=["B"])
def _sinkhorn_row_lse_kernel(
    S, V, U,                            # scores (B, K); v (K,) fp32; u (B,) fp32 (written)
    B, K, stride_b, inv_eps,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Sample step: u[b] = −LSE_k(L[b,k] + v[k]) for one block of rows."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lse = _row_lse(S, V, rows, rmask, tl.arange(0, BLOCK_K), K, stride_b, inv_eps, True, BLOCK_B, BLOCK_K)
    tl.store(U + rows, -lse, mask=rmask)


@triton.jit(do_not_specialize=["B", "n_row_blocks"])
def _sinkhorn_col_lse_kernel(
    S, U, PM, PS,                       # scores (B, K); u (B,) fp32; partial max / sum (G, K) fp32 (written)
    B, K, stride_b, inv_eps, n_row_blocks,
    HAS_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Prototype step, partial: (max, sum of exp) over the row blocks g, g+G, … of L[b,k] + u[b]."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    g = tl.program_id(1)
    n_g = tl.num_programs(1)
    cmask = cols < K
    offs_b = tl.arange(0, BLOCK_B)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    for rb in tl.range(g, n_row_blocks, n_g, num_stages=2):
        rows = rb * BLOCK_B + offs_b
        rmask = rows < B
        x = tl.load(S + rows.to(tl.int64)[:, None] * stride_b + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = x * inv_eps
        if HAS_U:
            x = x + tl.load(U + rows, mask=rmask, other=0.0)[:, None]
        x = tl.where(rmask[:, None], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))      # finite: row rb·BLOCK_B is always valid
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    out = g.to(tl.int64) * K + cols
    tl.store(PM + out, m, mask=cmask)
    tl.store(PS + out, s, mask=cmask)


@triton.jit(do_not_specialize=["B"])
def _sinkhorn_codes_kernel(
    S, V, OUT,                          # scores (B, K); v (K,) fp32; codes (B, K) fp32
    B, K, stride_b, inv_eps,
    NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if NORMALIZE:
        lse = _row_lse(S, V, rows, rmask, offs_k, K, stride_b, inv_eps, True, BLOCK_B, BLOCK_K)
    else:
        lse = tl.zeros([BLOCK_B], tl.float32)
    row_ptr = S + rows.to(tl.int64)[:, None] * stride_b
    out_ptr = OUT + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x * inv_eps + tl.load(V + cols, mask=cmask, other=0.0)[None, :] - lse[:, None]
        x = tl.where(mask, x, float("-inf"))
        tl.store(out_ptr + cols[None, :], tl.exp(x), mask=mask)


# --------------------------------------------------------------------------- launchers


def _blocks(K: int):
    """(BLOCK_B, BLOCK_K, num_warps) of the row-streaming kernels (row LSE, codes)."""
    if _INTERPRET:  # fewer, larger tiles: the interpreter pays per operation, not per element
        return 32, min(triton.next_power_of_2(K), 1024), 4
    # 8 warps: 16 elements of a 16×256 tile per thread (with 4 warps ptxas spilled the fp16 codes kernel)
    return 16, min(triton.next_power_of_2(K), 256), 8


def _col_blocks(K: int):
    """(BLOCK_B, BLOCK_K, num_warps) of the column kernel: a narrow column block streamed over many rows."""
    if _INTERPRET:
        return 32, min(triton.next_power_of_2(K), 64), 4
    return 64, min(triton.next_power_of_2(K), 128), 4


def _n_row_splits(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """G: row splits of the column kernel, so that G × (column blocks) fills the GPU about 4 times."""
    if _INTERPRET or device.type != "cuda":
        cap = 4
    else:
        cap = max(1, 4 * torch.cuda.get_device_properties(device).multi_processor_count // n_col_blocks)
    return max(1, min(n_row_blocks, cap))


def _prep(scores: Tensor) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be 2-D (B, K), got shape {tuple(scores.shape)}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    return scores


def _v32(v: Tensor, K: int, device: torch.device) -> Tensor:
    same_device("sinkhorn", device, v=v)
    if v.shape != (K,):
        raise ValueError(f"sinkhorn: v must have shape ({K},), got {tuple(v.shape)}")
    return v.to(torch.float32).contiguous()


@torch.library.triton_op("contrastive_ops_triton::sinkhorn_col_lse", mutates_args=())
def _sinkhorn_col_lse_op(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
    scores = _prep(scores)
    B, K = scores.shape
    if B == 0 or K == 0:
        return torch.full((K,), float("-inf"), dtype=torch.float32, device=scores.device)
    inv_eps = 1.0 / epsilon
    has_u = v is not None
    if has_u:
        BLOCK_B, BLOCK_K, num_warps = _blocks(K)
        u = torch.empty((B,), dtype=torch.float32, device=scores.device)
        wrap(_sinkhorn_row_lse_kernel)[(triton.cdiv(B, BLOCK_B),)](
            scores, _v32(v, K, scores.device), u, B, K, scores.stride(0), inv_eps,
            BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=num_warps,
        )
    BLOCK_B, BLOCK_K, num_warps = _col_blocks(K)
    n_rb, n_kb = triton.cdiv(B, BLOCK_B), triton.cdiv(K, BLOCK_K)
    G = _n_row_splits(n_rb, n_kb, scores.device)
    pm = torch.empty((G, K), dtype=torch.float32, device=scores.device)  # every entry written once
    ps = torch.empty((G, K), dtype=torch.float32, device=scores.device)
    wrap(_sinkhorn_col_lse_kernel)[(n_kb, G)](
        scores, u if has_u else pm, pm, ps, B, K, scores.stride(0), inv_eps, n_rb,
        HAS_U=has_u, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    # Every program owns at least one row block, so s ≥ 1 and m is finite.
    return torch.logsumexp(pm + torch.log(ps), dim=0)


@_sinkhorn_col_lse_op.register_fake
def _(scores, epsilon, v):
    return scores.new_empty((scores.shape[1],), dtype=torch.float32)


def _codes_launch(scores: Tensor, epsilon: float, v: Tensor, normalize: bool, out: Tensor) -> None:
    B, K = scores.shape
    if B == 0 or K == 0:
        return
    BLOCK_B, BLOCK_K, num_warps = _blocks(K)
    wrap(_sinkhorn_codes_kernel)[(triton.cdiv(B, BLOCK_B),)](
        scores, _v32(v, K, scores.device), out, B, K, scores.stride(0), 1.0 / epsilon,
        NORMALIZE=bool(normalize), BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )


@torch.library.triton_op("contrastive_ops_triton::sinkhorn_codes", mutates_args=())
def _sinkhorn_codes_op(scores: Tensor, epsilon: float, v: Tensor, normalize: bool) -> Tensor:
    scores = _prep(scores)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    _codes_launch(scores, epsilon, v, normalize, out)
    return out


@_sinkhorn_codes_op.register_fake
def _(scores, epsilon, v, normalize):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sinkhorn_codes_out", mutates_args={"out"})
def _sinkhorn_codes_out_op(scores: Tensor, epsilon: float, v: Tensor, normalize: bool, out: Tensor) -> None:
    scores = _prep(scores)
    same_device("sinkhorn_codes_out", scores.device, out=out)
    if out.shape != scores.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"sinkhorn: out must be a contiguous float32 tensor of shape {tuple(scores.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    _codes_launch(scores, epsilon, v, normalize, out)


@_sinkhorn_codes_out_op.register_fake
def _(scores, epsilon, v, normalize, out):
    return None


def sinkhorn_col_lse(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
    """(K,) fp32: LSE_b(S[b,k]/ε + u[b]) with u[b] = −LSE_k(S[b,k]/ε + v[k]) (u = 0 when ``v`` is None)."""
    return torch.ops.contrastive_ops_triton.sinkhorn_col_lse(scores, float(epsilon), v)


def sinkhorn_codes(scores: Tensor, epsilon: float, v: Tensor, normalize: bool,
                   out: Optional[Tensor] = None) -> Tensor:
    """(B, K) fp32: exp(S/ε + v − LSE_k(S/ε + v)) (without the LSE when ``normalize`` is False)."""
    if out is None:
        return torch.ops.contrastive_ops_triton.sinkhorn_codes(scores, float(epsilon), v, bool(normalize))
    torch.ops.contrastive_ops_triton.sinkhorn_codes_out(scores, float(epsilon), v, bool(normalize), out)
    return out


def sinkhorn_forward(scores: Tensor, epsilon: float, iterations: int, out: Optional[Tensor] = None) -> Tensor:
    """The whole Sinkhorn-Knopp loop: ``iterations`` column-LSE passes, then one pass writing the codes."""
    B, K = scores.shape
    if iterations == 0:
        total = torch.logsumexp(sinkhorn_col_lse(scores, epsilon, None), dim=0)
        v = (math.log(B) - total).expand(K)
        return sinkhorn_codes(scores, epsilon, v, False, out)
    v = None
    for _ in range(iterations):
        v = -sinkhorn_col_lse(scores, epsilon, v)
    return sinkhorn_codes(scores, epsilon, v, True, out)


class _Sinkhorn:
    """The ``"sinkhorn"`` primitive of the Triton backend (see ``contrastive_ops.losses.swav``)."""

    @staticmethod
    def forward(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
        return sinkhorn_forward(scores, float(epsilon), int(iterations))

    @staticmethod
    def col_lse(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
        return sinkhorn_col_lse(scores, float(epsilon), v)

    @staticmethod
    def codes(scores: Tensor, epsilon: float, v: Tensor, normalize: bool) -> Tensor:
        return sinkhorn_codes(scores, float(epsilon), v, normalize)


SINKHORN = _Sinkhorn()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): each kernel in every
    input dtype, at the blocks of K = 3000 prototypes (SwAV's default) and of K ≤ 128."""
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        for K in (3000, 128):
            bb, bk, w = _blocks(K)
            cb, ck, cw = _col_blocks(K)
            scal = dict(B="i32", K="i32", stride_b="i32", inv_eps="fp32")
            out.append(dict(name="sinkhorn_row_lse", fn=_sinkhorn_row_lse_kernel,
                            args=dict(S=t, V="*fp32", U="*fp32", **scal),
                            constexprs=dict(BLOCK_B=bb, BLOCK_K=bk), num_warps=w, num_stages=3, dtype=dtype, D=None))
            for has_u in (True, False):
                out.append(dict(name="sinkhorn_col_lse", fn=_sinkhorn_col_lse_kernel,
                                args=dict(S=t, U="*fp32", PM="*fp32", PS="*fp32", n_row_blocks="i32", **scal),
                                constexprs=dict(HAS_U=has_u, BLOCK_B=cb, BLOCK_K=ck), num_warps=cw, num_stages=3,
                                dtype=dtype, D=None))
            for norm in (True, False):
                out.append(dict(name="sinkhorn_codes", fn=_sinkhorn_codes_kernel,
                                args=dict(S=t, V="*fp32", OUT="*fp32", **scal),
                                constexprs=dict(NORMALIZE=norm, BLOCK_B=bb, BLOCK_K=bk), num_warps=w, num_stages=3,
                                dtype=dtype, D=None))
    return out
