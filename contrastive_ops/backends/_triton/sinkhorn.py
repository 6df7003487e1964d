r"""Triton kernels of the ``"sinkhorn"`` primitive (log-domain Sinkhorn-Knopp scalings).

Maths (see ``contrastive_ops.losses.swav``): with L = S/ε and log-scalings
u (B,), v (K,), one Sinkhorn iteration is::

    u[b] = −LSE_k(L[b,k] + v[k])        sample step   (row LSE)
    v[k] = −LSE_b(L[b,k] + u[b])        prototype step (column LSE)

``_sinkhorn_col_lse_kernel`` fuses both: a program owns blocks of BLOCK_B rows
(persistent, grid-stride over row blocks); for each block it first streams the
rows once to get u (online max / sum of exp), then streams them again (now in
L2) and folds the block's column max / sum of exp into the program's own
(K,) slice of a (G, K) partial buffer:

    m' = max(m, m_t),   s' = s·e^{m−m'} + s_t·e^{m_t−m'}

The G partials are combined on the host side as LSE_g(m_g + log s_g) (K values
each).  ``_sinkhorn_codes_kernel`` writes exp(L + v − LSE_k(L + v)) (or
exp(L + v) without normalization).  Every exponent is ≤ 0, so nothing
overflows for any finite input; scores are read in their dtype (fp32, fp16,
bf16) and upcast to fp32.  Apart from the (B, K) output, memory is O(G·K + B).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

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


@triton.jit
def _sinkhorn_col_lse_kernel(
    S, V, PM, PS,                       # scores (B, K); v (K,) fp32; partial max / sum (G, K) fp32
    B, K, stride_b, inv_eps, n_row_blocks,
    HAS_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    pm_ptr = PM + pid.to(tl.int64) * K
    ps_ptr = PS + pid.to(tl.int64) * K
    for rb in range(pid, n_row_blocks, n_prog):
        rows = rb * BLOCK_B + offs_b
        rmask = rows < B
        # Sample step: u[b] = −LSE_k(L[b,k] + v[k])   (u = 0 on the first iteration).
        if HAS_V:
            u = -_row_lse(S, V, rows, rmask, offs_k, K, stride_b, inv_eps, HAS_V, BLOCK_B, BLOCK_K)
            u = tl.where(rmask, u, 0.0)
        else:
            u = tl.zeros([BLOCK_B], tl.float32)
        # Prototype step, local part: fold this block's column LSE of L + u into the program's partials.
        row_ptr = S + rows.to(tl.int64)[:, None] * stride_b
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            cmask = cols < K
            x = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            x = x * inv_eps + u[:, None]
            x = tl.where(rmask[:, None], x, float("-inf"))
            m_t = tl.max(x, axis=0)                        # finite: row rb·BLOCK_B is always valid
            s_t = tl.sum(tl.exp(x - m_t[None, :]), axis=0)
            m_old = tl.load(pm_ptr + cols, mask=cmask, other=0.0)
            s_old = tl.load(ps_ptr + cols, mask=cmask, other=0.0)
            m_new = tl.maximum(m_old, m_t)
            s_new = s_old * tl.exp(m_old - m_new) + s_t * tl.exp(m_t - m_new)
            tl.store(pm_ptr + cols, m_new, mask=cmask)
            tl.store(ps_ptr + cols, s_new, mask=cmask)


@triton.jit
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
    if _INTERPRET:  # fewer, larger tiles: the interpreter pays per operation, not per element
        return 32, min(triton.next_power_of_2(K), 1024), 4
    return 16, min(triton.next_power_of_2(K), 256), 4


def _n_programs(n_row_blocks: int, device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        cap = 4
    else:
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_row_blocks, cap))


def _prep(scores: Tensor) -> Tensor:
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    return scores


def sinkhorn_col_lse(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
    """(K,) fp32: LSE_b(S[b,k]/ε + u[b]) with u[b] = −LSE_k(S[b,k]/ε + v[k]) (u = 0 when ``v`` is None)."""
    scores = _prep(scores)
    B, K = scores.shape
    BLOCK_B, BLOCK_K, num_warps = _blocks(K)
    n_rb = triton.cdiv(B, BLOCK_B)
    G = _n_programs(n_rb, scores.device)
    pm = torch.full((G, K), float("-inf"), dtype=torch.float32, device=scores.device)
    ps = torch.zeros((G, K), dtype=torch.float32, device=scores.device)
    has_v = v is not None
    vv = v.to(torch.float32).contiguous() if has_v else pm  # unused pointer when HAS_V is False
    _sinkhorn_col_lse_kernel[(G,)](
        scores, vv, pm, ps,
        B, K, scores.stride(0), 1.0 / epsilon, n_rb,
        HAS_V=has_v, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    # Every program owns at least one row block, so s ≥ 1 and m is finite.
    return torch.logsumexp(pm + torch.log(ps), dim=0)


def sinkhorn_codes(scores: Tensor, epsilon: float, v: Tensor, normalize: bool,
                   out: Optional[Tensor] = None) -> Tensor:
    """(B, K) fp32: exp(S/ε + v − LSE_k(S/ε + v)) (without the LSE when ``normalize`` is False)."""
    scores = _prep(scores)
    B, K = scores.shape
    BLOCK_B, BLOCK_K, num_warps = _blocks(K)
    if out is None:
        out = torch.empty((B, K), dtype=torch.float32, device=scores.device)
    _sinkhorn_codes_kernel[(triton.cdiv(B, BLOCK_B),)](
        scores, v.to(torch.float32).contiguous(), out,
        B, K, scores.stride(0), 1.0 / epsilon,
        NORMALIZE=bool(normalize), BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    return out


def sinkhorn_forward(scores: Tensor, epsilon: float, iterations: int, out: Optional[Tensor] = None) -> Tensor:
    """The whole Sinkhorn-Knopp loop: ``iterations`` fused passes, then one pass writing the codes."""
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
