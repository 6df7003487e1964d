"""Shared test helpers: which backends run here, per-dtype tolerances, and one
checker that compares any backend with the reference, forward and gradients."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import pytest
import torch

import contrastive_ops as co
# The one tolerance table and comparison rule (fp32 elementwise; fp16/bf16
# relative to the reference run in the same dtype) live in the library.
from contrastive_ops.testing import HALF, TOL, assert_close, fp32_products  # noqa: F401  (re-exported for the tests)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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


# Backends this machine must have (``.ci/run`` sets cpu,triton,cuda): a missing
# one fails ``tests/test_required_backends.py`` and its tests instead of skipping.
REQUIRED_BACKENDS = tuple(x.strip() for x in os.environ.get("CONTRASTIVE_OPS_REQUIRE_BACKENDS", "").split(",")
                          if x.strip())


def backend_params(device: torch.device = DEVICE):
    """``pytest.param`` per kernel backend; a missing backend is skipped with its reason.

    A backend named in ``$CONTRASTIVE_OPS_REQUIRE_BACKENDS`` that can run on
    ``device`` here (``cuda`` needs a GPU) is not skipped: its tests fail.
    ``CI=true`` requires ``cpu`` and ``triton`` on a CPU machine as before.
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
            required = ((name in REQUIRED_BACKENDS and (name != "cuda" or torch.cuda.is_available()))
                        or (os.environ.get("CI") == "true" and device.type == "cpu" and name in ("cpu", "triton")))
            marks = [] if required else [pytest.mark.skip(reason=f"{name} backend not usable here: {why}")]
            params.append(pytest.param(name, id=name, marks=marks))
    return params


def compare_with_reference(
    fn: Callable,
    tensors: Sequence[torch.Tensor],
    *,
    backend: str,
    dtype: torch.dtype,
    grad_output_scale: float = 2.0,
    sharpness: float = 0.0,
    normalized: bool = False,
    **kwargs,
):
    """Run ``fn(*tensors, backend=..., **kwargs)`` on ``backend`` and on the reference.

    Floating tensors marked ``requires_grad`` get their gradients compared.
    The kernel backend gets inputs in ``dtype``; the reference gets the same
    values upcast to float32 (float64 stays float64), so the comparison
    measures the kernel's error against the exact loss.  For fp16/bf16 the
    reference also runs in ``dtype``, and the kernel's error may be at most
    ``HALF_C`` times that run's (``contrastive_ops.testing``).  The loss is
    multiplied by ``grad_output_scale`` (and by a random vector for
    ``reduction="none"``) so that a non-unit upstream gradient is exercised.

    ``sharpness`` (the logit scale, 1/τ) sizes the gradient terms that can
    cancel (each rounded to ``dtype`` before they are summed: a loss that is
    constant, e.g. one pair, has an exact gradient of 0); ``normalized`` says
    that ``fn`` normalizes its feature inputs, whose gradients are then divided
    by their row norms.  Both only enter the small atol of the half-precision rule.
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

    runs = {"kernel": (backend, dtype), "exact": ("reference", ref_dtype)}
    if dtype in HALF:
        runs["low"] = ("reference", dtype)
    ins = {key: clone(tensors, dt) for key, (_b, dt) in runs.items()}
    outs = {key: fn(*ins[key], backend=b, **kwargs) for key, (b, _dt) in runs.items()}
    k_out, r_out = outs["kernel"], outs["exact"]
    low = outs.get("low")
    assert torch.isfinite(k_out).all(), f"{backend} produced a non-finite loss: {k_out}"
    # an LSE minus a positive logit (each about ``sharpness`` in size) cancels to 0 for a single pair
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    products = fp32_products(backend, device)
    assert_close(k_out, r_out, dtype, low=low, unit=sharpness, inv_norm=1.0, what="loss", products=products)
    w = torch.randn_like(r_out) if r_out.dim() > 0 else torch.tensor(grad_output_scale, dtype=r_out.dtype)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in ins["kernel"]):
        for key, out in outs.items():
            (out * w.to(out.dtype)).sum().backward()
        # the upstream gradient of one anchor: a scalar loss is a mean over the rows of the first input
        rows = tensors[0].shape[0] if r_out.dim() == 0 and tensors[0].dim() > 0 else 1
        unit = float(w.abs().max()) * sharpness / max(1, rows)
        for i, (a, b) in enumerate(zip(ins["kernel"], ins["exact"])):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert a.grad is not None, f"no gradient for input {i} on {backend}"
                assert torch.isfinite(a.grad).all(), f"non-finite gradient for input {i} on {backend}"
                inv_norm = 1.0
                if normalized and a.dim() > 0:
                    inv_norm = 1.0 / float(b.detach().norm(dim=-1).min().clamp_min(1e-12))
                assert_close(a.grad, b.grad, dtype, low=None if low is None else ins["low"][i].grad,
                             unit=unit, inv_norm=inv_norm, what=f"grad of input {i}", products=products)
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


def triton_assert_close(*args, **kwargs) -> None:
    """``assert_close`` for results of the Triton kernels on ``DEVICE``: their fp32 products are tf32x3
    on a GPU (``contrastive_ops.testing.fp32_products``), IEEE under the interpreter."""
    kwargs.setdefault("products", fp32_products("triton", DEVICE))
    assert_close(*args, **kwargs)


def check_nan_logits(backend, device, B, M):
    """A NaN logit makes its row's and its column's LSE NaN, and no other LSE.

    A NaN must win the maxima, wherever it sits (a tile, a sub-block, a fold of rows, a lane), or a
    maximum of -inf over the rest drops it from the sum, and a finished LSE must not test its sum
    with ``> 0``: row 4 sees one column only, so its NaN logit is alone among masked ones; row 7's
    NaN logit (column 3) sits among finite ones.
    """
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, 4, generator=gen), torch.randn(M, 4, generator=gen)
    q[4, 1] = float("nan")
    k[3, 0] = float("nan")
    start, end = torch.full((B,), 4), torch.full((B,), M)
    start[4], end[4] = 6, 7  # row 4: one logit, NaN, at column 6
    start[7], end[7] = 2, 5  # row 7: columns 2..4; column 3 is seen by row 7 only
    kw = dict(col_start=start.to(device), col_end=end.to(device))
    q, k, scale = q.to(device), k.to(device), torch.tensor(1.7, device=device)
    from contrastive_ops.primitives.sim_lse import sim_lse

    row, col = sim_lse(q, k, scale, want_col=True, backend=backend, **kw)
    ref_row, ref_col = sim_lse(q, k, scale, want_col=True, backend="reference", **kw)
    assert torch.isnan(row).nonzero().flatten().tolist() == [4, 7]
    assert torch.isnan(col).nonzero().flatten().tolist() == [3, 6]
    for name, a, b in (("row_lse", row, ref_row), ("col_lse", col, ref_col)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)), name
        fin = torch.isfinite(b)
        assert_close(a[fin], b[fin], torch.float32, what=name)
    # q is k with the self pair excluded (the Gram kernels where a backend has them): feature row 4
    # NaN, so every row sees one NaN logit (row 4 sees only NaN ones)
    z = torch.randn(B, 4, generator=gen)
    z[4, 2] = float("nan")
    z = z.to(device)
    row, _ = sim_lse(z, z, scale, backend=backend, exclude=torch.arange(B, device=device)[:, None])
    assert torch.isnan(row).all(), row
