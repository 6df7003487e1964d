"""Shared test helpers: which backends run here, per-dtype tolerances, and one
checker that compares any backend with the reference, forward and gradients."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Sequence

import pytest
import torch

import contrastive_ops as co

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Absolute/relative tolerances of a kernel backend against the fp32/fp64 reference.
TOL: Dict[torch.dtype, dict] = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def kernel_backends(device: torch.device = DEVICE) -> list:
    """Kernel backends that run on ``device`` here (the reference excluded)."""
    out = []
    for name, (ok, _why) in co.available_backends().items():
        if name == "reference" or not ok:
            continue
        from contrastive_ops import backends

        if device.type in backends.backend_module(name).devices():
            out.append(name)
    return out


def backend_params(device: torch.device = DEVICE):
    """``pytest.param`` per kernel backend; a missing backend is skipped with its reason.

    Under CI (``CI=true``) the CPU machine must have the ``cpu`` and ``triton``
    backends: there a missing one fails instead of skipping.
    """
    avail = co.available_backends()
    params = []
    for name in ("cpu", "triton", "cuda"):
        ok, why = avail[name]
        from contrastive_ops import backends

        runs_here = ok and device.type in backends.backend_module(name).devices()
        if runs_here:
            params.append(pytest.param(name, id=name))
        else:
            required = os.environ.get("CI") == "true" and device.type == "cpu" and name in ("cpu", "triton")
            marks = [] if required else [pytest.mark.skip(reason=f"{name} backend not usable here: {why}")]
            params.append(pytest.param(name, id=name, marks=marks))
    return params


def assert_close(actual, expected, dtype, *, scale=1.0, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale,
        msg=lambda m: f"{what}: {m}",
    )


def compare_with_reference(
    fn: Callable,
    tensors: Sequence[torch.Tensor],
    *,
    backend: str,
    dtype: torch.dtype,
    grad_output_scale: float = 2.0,
    tol_scale: float = 1.0,
    **kwargs,
):
    """Run ``fn(*tensors, backend=..., **kwargs)`` on ``backend`` and on the reference.

    Floating tensors marked ``requires_grad`` get their gradients compared.
    The kernel backend gets inputs in ``dtype``; the reference gets the same
    values upcast to float32 (float64 stays float64), so the comparison
    measures the kernel's error against the exact loss.  The loss is
    multiplied by ``grad_output_scale`` (and by a random vector for
    ``reduction="none"``) so that a non-unit upstream gradient is exercised.
    """
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def clone(ts, dt):
        out = []
        for t in ts:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                c = t.detach().to(dt).clone().requires_grad_(t.requires_grad)
            else:
                c = t
            out.append(c)
        return out

    k_in = clone(tensors, dtype)
    r_in = clone(tensors, ref_dtype)
    k_out = fn(*k_in, backend=backend, **kwargs)
    r_out = fn(*r_in, backend="reference", **kwargs)
    assert torch.isfinite(k_out).all(), f"{backend} produced a non-finite loss: {k_out}"
    assert_close(k_out, r_out.detach(), dtype, scale=tol_scale, what="loss")
    w = torch.randn_like(r_out) if r_out.dim() > 0 else torch.tensor(grad_output_scale, dtype=r_out.dtype)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in k_in):
        (k_out * w.to(k_out.dtype)).sum().backward()
        (r_out * w).sum().backward()
        for i, (a, b) in enumerate(zip(k_in, r_in)):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert a.grad is not None, f"no gradient for input {i} on {backend}"
                assert torch.isfinite(a.grad).all(), f"non-finite gradient for input {i} on {backend}"
                assert_close(a.grad.float() if a.grad.dtype != torch.float64 else a.grad,
                             b.grad, dtype, scale=tol_scale, what=f"grad of input {i}")
    return k_out, r_out


@contextlib.contextmanager
def nan_filled_memory():
    """Within the block, uninitialized tensors (``torch.empty``) are filled with NaN.

    A kernel that leaves part of an output or tile buffer unwritten then
    returns NaN there.  The previous settings are restored on exit.
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()  # the poison is active
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def serve_dense_primitive(monkeypatch, prim):
    """Make ``backends.primitive("dense", ...)`` return ``prim`` for this test; other names resolve as usual.

    ``prim`` is a plain-PyTorch stand-in for a kernel primitive, so the fused
    compositions run through the kernel interface without a kernel.  Returns ``prim``.
    """
    from contrastive_ops import backends

    real = backends.primitive
    monkeypatch.setattr(backends, "primitive", lambda name, p: prim if name == "dense" else real(name, p))
    return prim
