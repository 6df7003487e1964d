"""The cuBLAS products of the Triton GEMM backwards (dQ = dS·K, dK = dSᵀ·Q, SigLIP's G·Y and Gᵀ·X).

``mm_f32`` returns a·b in fp32:

- 16-bit operands on a GPU: one tensor-core product with fp32 accumulation (``out_dtype``);
- fp32 operands on a GPU: three bf16 terms each (``split_bf16x3``: x = h + m + l to about 2⁻²⁴ of
  |x|), and the six products whose order is at most 2⁻¹⁶ (hh, hm, mh, hl, mm, lh), each exact in
  fp32 and summed by cuBLAS in fp32, smallest first: fp32-level error on tensor cores, as the
  Triton kernels' tf32x3 dots (about 2.5× the rate of cuBLAS's IEEE fp32 GEMM on the FMA units,
  at the measured bf16 rate).  Plain TF32 instead when the user enabled it globally
  (``torch.backends.cuda.matmul.allow_tf32``): then torch multiplies as asked;
- elsewhere (the interpreter's CPU tensors): the product in fp32.

The split operand is processed ``SPLIT_ROWS_ELEMS`` elements at a time, so its three bf16 copies
stay small beside the dS block.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor

SPLIT_ROWS_ELEMS = 1 << 26  # elements of ``a`` split at a time (3 bf16 copies: 384 MiB)


def split_bf16x3(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(h, m, l) in bf16 with h + m + l = x up to the rounding of l (about 2⁻²⁴·|x|)."""
    x = x.float()
    h = x.to(torch.bfloat16)
    r = x - h.float()
    m = r.to(torch.bfloat16)
    return h, m, (r - m.float()).to(torch.bfloat16)


def _mm_out_f32(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a, b, out_dtype=torch.float32)


def mm_bf16x6(a: Tensor, b: Tensor, mm: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
    """a·b in fp32 from bf16 products of the three-term splits of a and b (module docstring).
    ``mm``: the product of two bf16 matrices with an fp32 result (cuBLAS's by default; tests pass
    one that multiplies in fp32 on the CPU)."""
    mm = mm or _mm_out_f32
    bh, bm, bl = split_bf16x3(b)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    step = max(1, SPLIT_ROWS_ELEMS // max(1, a.shape[1]))
    for r0 in range(0, a.shape[0], step):
        ah, am, al = split_bf16x3(a[r0:r0 + step])
        acc = mm(ah, bl)
        acc += mm(am, bm)
        acc += mm(al, bh)
        acc += mm(ah, bm)
        acc += mm(am, bh)
        acc += mm(ah, bh)
        out[r0:r0 + step] = acc
    return out


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a·b with an fp32 result, as the GEMM backwards need it (module docstring)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        return mm_bf16x6(a, b)
    return torch.mm(a.float(), b.float())
