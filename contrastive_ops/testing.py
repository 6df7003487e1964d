r"""How a kernel backend is compared with the reference: one tolerance table, one rule.

Used by the self-check (``python -m contrastive_ops``) and by the test suite.

float64 / float32
    Elementwise ``|kernel − exact| ≤ atol + rtol·|exact| + cancel·inv_norm·unit``
    with the atol/rtol of :data:`TOL` (times a ``scale`` the caller derives from
    the logit scale in fp32, where the rounding of a logit grows with it) and
    ``cancel`` a few units of the dtype's rounding (:data:`CANCEL`, 8·2⁻²⁴ in fp32): an exact
    value of 0 that is the cancellation of terms of size ``unit`` (see below;
    a loss with one pair is constant) is met to a few roundings of those
    terms, whatever the order the kernel sums them in.  A kernel whose fp32
    products are not IEEE (``products``, see :func:`fp32_products`: the Triton
    kernels on a GPU run them on tensor cores as ``tf32x3``) is held to the fp32
    tolerance times the ratio of its product rounding to fp32's
    (:data:`PRODUCTS_SCALE`).

float16 / bfloat16 (flash-attention's rule)
    The kernel reads inputs rounded to the half dtype and returns gradients in
    it, so part of its error is the rounding of its inputs and outputs, which
    the exact answer (the reference in fp32 on the same rounded values) does
    not have.  The reference run *in the half dtype* has that same rounding,
    and nothing else.  So, per output (the loss, each gradient)::

        max|kernel − exact| ≤ c · max|reference_in_half − exact| + atol

    with ``c`` = :data:`HALF_C` (≤ 3) and a small
    ``atol = TOL[float32]["atol"]·scale + TOL[dtype]["half_atol"] · (max|exact| + inv_norm · unit)``:
    the fp32 floor (the outputs accumulate in fp32; an exact value of 0 is
    not met exactly) plus a few units of the dtype's rounding of the output's
    own size.  ``unit``
    is the size a gradient term has before it cancels
    (|upstream gradient of one anchor| · logit scale · |features|, given by
    the caller);
    the terms are rounded to the half dtype before autograd sums them, and an
    exact gradient of 0 (a loss with one pair is constant) is their
    cancellation; ``inv_norm`` is 1/‖x‖ for the gradient of an input that the
    loss normalizes (the backward of x ↦ x/‖x‖ divides by ‖x‖), 1 for an
    input used as it is.  For the loss, ``unit`` is the size of the logits
    (an LSE minus a positive logit cancels to 0 for a single pair) and there
    is no 1/‖x‖.  ``unit`` = 0 (the default) drops the term.
    A gradient off by 1.5× (error ½·max|exact|) is far outside it.

    Without a half-precision run of the reference (a primitive compared on
    its own), the elementwise ``atol``/``rtol`` of :data:`TOL` apply.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

Tensor = torch.Tensor

# Per dtype: ``atol``/``rtol`` of the elementwise comparison (fp32/fp64, and
# half-precision results that have no half-precision reference run);
# ``half_atol``: the small absolute term of the half-precision rule, in units of
# the output's size.
TOL: Dict[torch.dtype, dict] = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2, half_atol=2e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2, half_atol=1.6e-2),
}
# Per dtype (fp32/fp64): ``cancel``, a few units of rounding of the terms that cancel to an exact 0, in the
# elementwise rule (``cancel·inv_norm·unit``; see the module docstring).
CANCEL: Dict[torch.dtype, float] = {torch.float64: 8 * 2.0**-53, torch.float32: 8 * 2.0**-24}

# fp32 products other than IEEE, and the factor on the fp32 tolerance: tf32x3 splits each fp32
# operand into a TF32 high part and a TF32 low part and drops the low·low term, so a product keeps
# about 22 of fp32's 24 significand bits (relative error up to 2^-21, 8 units of fp32's 2^-24):
# 8×.  Plain tf32 products keep fp16's 11 bits: the fp16 elementwise tolerance, 100× fp32's.
# Accumulation stays fp32 in both.
PRODUCTS_SCALE: Dict[str, float] = {"ieee": 1.0, "tf32x3": 8.0, "tf32": 100.0}


def fp32_products(backend: str, device) -> str:
    """How ``backend`` multiplies fp32 inputs on ``device``: ``"ieee"``, ``"tf32x3"`` or ``"tf32"``
    (the Triton kernels on a GPU: tf32x3, or tf32 where TF32 matmuls are enabled globally)."""
    if backend == "triton" and torch.device(device).type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


# c of the half-precision rule: the kernel may be this many times as far from
# the exact answer as the reference run in the same dtype.
HALF_C = 2.0

HALF = (torch.float16, torch.bfloat16)


def _worst(err: Tensor, bound: Tensor, a: Tensor, e: Tensor) -> str:
    i = int((err - bound).flatten().argmax())
    return (f"worst at flat index {i}: got {a.flatten()[i].item():.8g}, exact {e.flatten()[i].item():.8g} "
            f"(|diff| {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g})")


def compare(what: str, actual: Tensor, exact: Tensor, dtype: torch.dtype, *, low: Optional[Tensor] = None,
            scale: float = 1.0, unit: float = 0.0, inv_norm: float = 0.0, products: str = "ieee") -> Optional[str]:
    """``None`` if ``actual`` (a kernel's output for inputs in ``dtype``) is close enough to ``exact``.

    ``exact``: the reference on the same (rounded) values in fp32 (fp64 for
    fp64).  ``low``: the reference run in ``dtype`` (fp16/bf16 only); with it
    the half-precision rule of this module applies, otherwise the elementwise
    :data:`TOL`.  ``scale`` widens the elementwise tolerance (fp32 at large
    logit scales); ``unit`` and ``inv_norm`` enter the half-precision atol
    (see the module docstring); ``products`` (fp32 only) is how the kernel
    multiplied (:func:`fp32_products`).  Otherwise a one-line description of
    the worst element.
    """
    if products not in PRODUCTS_SCALE:
        raise ValueError(f"products must be one of {sorted(PRODUCTS_SCALE)}, got {products!r}")
    if dtype == torch.float32:
        scale = scale * PRODUCTS_SCALE[products]
    if actual.shape != exact.shape:
        return f"{what}: shape {tuple(actual.shape)} != reference {tuple(exact.shape)}"
    a = actual.detach().double().cpu()
    e = exact.detach().double().cpu()
    if not torch.isfinite(e).all():
        return f"{what}: the reference is not finite"
    if not torch.isfinite(a).all():
        return f"{what}: {int((~torch.isfinite(a)).sum())} of {a.numel()} values not finite"
    if a.numel() == 0:
        return None
    err = (a - e).abs()
    tol = TOL[dtype]
    if low is not None and dtype in HALF:
        lo = low.detach().double().cpu()
        if lo.shape != e.shape:
            return f"{what}: half-precision reference shape {tuple(lo.shape)} != {tuple(e.shape)}"
        ref_err = float((lo - e).abs().nan_to_num(posinf=0.0).max())
        # the fp32 floor: outputs accumulated in fp32 whose exact value is ~0
        atol = TOL[torch.float32]["atol"] * scale + tol["half_atol"] * (float(e.abs().max()) + inv_norm * unit)
        allowed = HALF_C * ref_err + atol
        if float(err.max()) > allowed:
            bound = torch.full_like(err, allowed)
            return (f"{what}: max |err| {float(err.max()):.3g} > {HALF_C:g}·{ref_err:.3g} (the {dtype} reference's "
                    f"error) + atol {atol:.3g}; {_worst(err, bound, a, e)}")
        return None
    atol = tol["atol"] * scale + CANCEL.get(dtype, 0.0) * scale * inv_norm * unit
    bound = atol + tol["rtol"] * scale * e.abs()
    bad = err > bound
    if bad.any():
        return (f"{what}: {int(bad.sum())} of {a.numel()} values off (atol {atol:.3g}, "
                f"rtol {tol['rtol'] * scale:.3g}); {_worst(err, bound, a, e)}")
    return None


def assert_close(actual: Tensor, exact: Tensor, dtype: torch.dtype, *, low: Optional[Tensor] = None,
                 scale: float = 1.0, unit: float = 0.0, inv_norm: float = 0.0, what: str = "",
                 products: str = "ieee") -> None:
    """:func:`compare`, raising ``AssertionError`` with its description."""
    problem = compare(what or "value", actual, exact, dtype, low=low, scale=scale, unit=unit, inv_norm=inv_norm,
                      products=products)
    if problem is not None:
        raise AssertionError(problem)
