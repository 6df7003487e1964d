r"""Self-check: every loss on a kernel backend against the reference, forward and gradients.

The kernel backend gets inputs in the dtype under test; the reference gets the
same (rounded) values in float32 (float64 stays float64), so the comparison
measures the kernel's error against the exact loss of its inputs.  The loss is multiplied by 1.7 (by a
random vector for per-anchor outputs) before the backward pass, so that an
upstream gradient other than 1 is exercised.  The comparison is
``contrastive_ops.testing.compare``, the test suite's: elementwise in fp32;
in fp16/bf16 the kernel may be at most ``HALF_C`` times as far from the exact
answer as the reference run in the same dtype (plus a small atol).  Sizes are deliberately ragged
(N=37, D=29: not multiples of a block, D not a power of two).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..testing import HALF, TOL, compare, fp32_products  # noqa: F401  (TOL: the one tolerance table, shared with the tests)
from .cases import LossCase, backend_why_not, cast_inputs

PASS, FAIL, UNAVAILABLE = "PASS", "FAIL", "n/a"

CHECK_N, CHECK_D = 37, 29


@dataclass
class CheckResult:
    loss: str
    variant: str
    backend: str
    device: str
    dtype: str
    status: str
    detail: str = ""
    traceback: str = ""


def _grads(out: torch.Tensor, leaves, weight: torch.Tensor):
    loss = (out * weight.to(out.dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_case(case: LossCase, backend: str, device, dtype: torch.dtype, variant: str = "default", *,
               n: int = CHECK_N, dim: int = CHECK_D, seed: int = 0) -> CheckResult:
    """Compare ``backend`` with the reference on one variant of ``case``."""
    device = torch.device(device)
    res = CheckResult(case.name, variant, backend, device.type, str(dtype).replace("torch.", ""), PASS)
    base = case.make(n, dim, torch.float32, device, seed=seed, variant=variant, small=True)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # the reference sees the very values the kernel sees (rounded to ``dtype``), in higher precision
    k_in = cast_inputs(base, dtype)
    r_in = cast_inputs(k_in, ref_dtype)
    # fp16/bf16: the reference run in the same dtype measures the error of rounding alone
    l_in = cast_inputs(k_in, dtype) if dtype in HALF else None
    try:
        r_out = case.call("reference", r_in)
    except Exception as e:  # noqa: BLE001 - the reference failing is a FAIL, shown with its error
        res.status, res.detail = FAIL, f"reference: {type(e).__name__}: {e}"
        res.traceback = traceback.format_exc()
        return res
    why = backend_why_not(case, backend, k_in)
    if why is not None:
        res.status, res.detail = UNAVAILABLE, why
        return res
    try:
        k_out = case.call(backend, k_in)
        problems = []
        l_out = case.call("reference", l_in) if l_in is not None else None
        products = fp32_products(backend, device)
        p = compare("loss", k_out, r_out, dtype, low=l_out, products=products)
        if p:
            problems.append(p)
        if base.differentiable and torch.isfinite(k_out).all():
            g = torch.Generator().manual_seed(seed + 1)
            weight = (torch.randn(r_out.shape, generator=g, dtype=torch.float64) if r_out.dim() > 0
                      else torch.tensor(1.7, dtype=torch.float64)).to(device)
            k_leaves, r_leaves = k_in.leaves(), r_in.leaves()
            k_g = _grads(k_out, k_leaves, weight)
            r_g = _grads(r_out, r_leaves, weight.to(r_out.dtype))
            l_g = (_grads(l_out, l_in.leaves(), weight.to(l_out.dtype)) if l_out is not None
                   else [None] * len(r_g))
            for i, (a, b, lo, leaf) in enumerate(zip(k_g, r_g, l_g, r_leaves)):
                name = f"grad of input {i} {tuple(leaf.shape)}"
                if b is None and a is None:
                    continue
                if a is None:
                    problems.append(f"{name}: no gradient from {backend}")
                    continue
                if b is None:
                    b = torch.zeros_like(leaf)
                if l_out is not None and lo is None:
                    lo = torch.zeros_like(leaf)
                p = compare(name, a, b, dtype, low=lo, products=products)
                if p:
                    problems.append(p)
    except Exception as e:  # noqa: BLE001 - a kernel failure is a FAIL, shown with its error
        res.status, res.detail = FAIL, f"{type(e).__name__}: {e}"
        res.traceback = traceback.format_exc()
        return res
    if problems:
        res.status, res.detail = FAIL, "; ".join(problems)
    return res


def run_checks(cases: List[LossCase], targets, dtypes, *, progress=None, all_variants: bool = True
               ) -> List[CheckResult]:
    """Every variant (or only the default one) of every case on every ``(backend, device)`` and dtype."""
    out = []
    for case in cases:
        for backend, device in targets:
            for dtype in dtypes:
                for variant in (case.variants if all_variants else case.variants[:1]):
                    out.append(check_case(case, backend, device, dtype, variant))
                    if progress is not None:
                        progress.update(1, note=f"{case.name}/{variant} on {backend}")
    return out


def reference_smoke(case: LossCase, device) -> CheckResult:
    """Run the reference once (finite forward and gradients) when no kernel backend can be checked."""
    res = CheckResult(case.name, "default", "reference", torch.device(device).type, "float32", PASS)
    inp = case.make(CHECK_N, CHECK_D, torch.float32, device, small=True)
    try:
        out = case.call("reference", inp)
        if not torch.isfinite(out).all():
            res.status, res.detail = FAIL, "reference loss not finite"
        elif inp.differentiable:
            grads = torch.autograd.grad(out.sum(), inp.leaves(), allow_unused=True)
            if not all(g is None or torch.isfinite(g).all() for g in grads):
                res.status, res.detail = FAIL, "reference gradient not finite"
    except Exception as e:  # noqa: BLE001
        res.status, res.detail = FAIL, f"{type(e).__name__}: {e}"
        res.traceback = traceback.format_exc()
    return res
