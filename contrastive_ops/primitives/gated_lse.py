r"""Primitive ``"gated_lse"``: a row LSE of per-pair gated, normalized similarities over a column range per row.

Maths
-----
Anchors are the rows of ``a`` (B, D) and ``w`` (B, D), candidates the rows of ``k`` (M, D)::

    G[i, j] = Σ_d a_id k_jd                  (B, M)
    N[i, j] = Σ_d w_id k_jd²                 (B, M)   (w ≥ 0: the gate squared)
    r[i, j] = max(N[i, j], eps²)^(-1/2)
    S[i, j] = scale · G[i, j] · r[i, j]
    lse[i]  = LSE_{start_i ≤ j < end_i} S[i, j]     (B,)   −inf where the range is empty

With ``a = n(z ⊙ g) ⊙ g`` and ``w = g ⊙ g`` (n(x) = x / max(‖x‖, eps)),
S[i, j] = scale · n(z_i ⊙ g_i) · n(k_j ⊙ g_i): hydra's ``Filter`` logit, each
key normalized under the anchor's gate (``losses/hydra.py``), computed in the
order of its reference (``gated_logits``).

Backward, with upstream gradient γ (B,) and P[i, j] = e^{S_ij − lse_i} on the
range (0 elsewhere)::

    dS  = γ_i · P_ij
    dG  = dS · scale · r                      dN = −½ · dS · S / N   where N ≥ eps² (0 where clamped)
    da  = dG k          dw = dN (k ⊙ k)       dk = dGᵀ a + 2 k ⊙ (dNᵀ w)
    dscale = Σ_ij dS_ij · G_ij · r_ij

Only the row statistics (lse and γ) are needed to recompute P tile by tile:
no B×M buffer.

Kernel backends implement ``"gated_lse"`` as an object with::

    forward(a, w, k, scale, col_start, col_end) -> lse (B,) fp32
    backward(a, w, k, scale, col_start, col_end, lse, grad_lse) -> (da fp32, dw fp32, dk like k, dscale 0-dim fp32)

with ``a``, ``w`` fp32, ``k`` fp32/fp16/bf16, ``scale`` a 0-dim fp32 tensor and
``col_start``, ``col_end`` (B,) int32 in [0, M].  Kernels:
``backends/_triton/gated_lse.py`` and ``csrc/cpu/gated_lse.cpp`` (the ``"cpu"``
backend, which also takes float64 ``a``, ``w``, ``k``, computed in float64).
The ``"cuda"`` backend does not implement it.
"""
from __future__ import annotations


import torch

from .. import backends
from .._numerics import acc_dtype

Tensor = torch.Tensor
EPS = 1e-12  # NORM_EPS of the losses: the clamp of F.normalize


def gated_lse_reference(a: Tensor, w: Tensor, k: Tensor, scale: Tensor, col_start: Tensor, col_end: Tensor,
                        eps: float = EPS) -> Tensor:
    """Dense PyTorch version (differentiable by autograd); stores B×M."""
    dt = acc_dtype(a.dtype)
    a, w, k = a.to(dt), w.to(dt), k.to(dt)
    S = (a @ k.T) * (w @ (k * k).T).clamp_min(eps * eps).rsqrt() * scale.to(dt)
    cols = torch.arange(k.shape[0], device=a.device)[None, :]
    allowed = (cols >= col_start.long()[:, None]) & (cols < col_end.long()[:, None])
    return torch.logsumexp(S.masked_fill(~allowed, float("-inf")), 1)


class GatedLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"gated_lse"`` primitive (contract in the module docstring)."""

    @staticmethod
    def forward(ctx, a, w, k, scale, col_start, col_end, backend):
        prim = backends.primitive(backend, "gated_lse")
        lse = prim.forward(a, w, k, scale, col_start, col_end)
        ctx.prim = prim
        ctx.save_for_backward(a, w, k, scale, col_start, col_end, lse)
        return lse

    @staticmethod
    def backward(ctx, g_lse):
        a, w, k, scale, col_start, col_end, lse = ctx.saved_tensors
        da, dw, dk, dscale = ctx.prim.backward(a, w, k, scale, col_start, col_end, lse, g_lse.contiguous())
        need = ctx.needs_input_grad
        return (da if need[0] else None, dw if need[1] else None, dk if need[2] else None,
                dscale if need[3] else None, None, None, None)


def gated_lse(a: Tensor, w: Tensor, k: Tensor, scale, *, col_start: Tensor, col_end: Tensor, backend: str
              ) -> Tensor:
    """Row LSE over ``[col_start_i, col_end_i)`` of ``scale · (a_i·k_j) / max(‖k_j ⊙ √w_i‖, eps)``.

    ``a``, ``w`` (B, D) and ``k`` (M, D); ``col_start``, ``col_end`` (B,) integer.  ``backend`` is a
    concrete backend name; ``"reference"`` is the dense version.  Returns fp32 (float64 for float64
    inputs), differentiable in a, w, k and scale; −inf for an empty range.
    """
    B = a.shape[0]
    if a.dim() != 2 or w.shape != a.shape or k.dim() != 2 or k.shape[1] != a.shape[1]:
        raise ValueError(f"gated_lse: a and w must be (B, D) and k (M, D), got {tuple(a.shape)}, "
                         f"{tuple(w.shape)} and {tuple(k.shape)}")
    for name, t in (("col_start", col_start), ("col_end", col_end)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"gated_lse: {name} must have shape ({B},), got {tuple(t.shape)}")
    dt = acc_dtype(a.dtype)
    scale = torch.as_tensor(scale, device=a.device).to(dt).reshape(())
    cs = col_start.to(device=a.device, dtype=torch.int32).clamp(0, k.shape[0]).contiguous()
    ce = col_end.to(device=a.device, dtype=torch.int32).clamp(0, k.shape[0]).contiguous()
    if backend == "reference":
        return gated_lse_reference(a, w, k, scale, cs, ce)
    return GatedLSEFunction.apply(a.contiguous(), w.contiguous(), k.contiguous(), scale, cs, ce, backend)
