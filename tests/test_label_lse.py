"""The label_lse primitive (row LSE of similarities plus a per-pair label-distance log-weight): the dense
reference against a float64 loop (value and the backward formula), every kernel backend that has it against
the reference (forward and the gradients of q, k and scale; float64 on CPU, fp32, fp16, bf16; ragged sizes
across the tiles, every weight kind, column ranges with empty ones, exclude, skip_equal), NaN-poisoned
outputs, determinism, bad input, the "cuda" backend without it."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_ops import backends
from contrastive_ops.primitives.label_lse import KINDS, label_lse, label_lse_reference
from helpers import backend_params, compare_with_reference, nan_filled_memory

F64 = torch.float64
FUSED = [p for p in backend_params() if p.values[0] in ("cpu", "triton")]


def _w(d, kind):
    return {"L1_inv": d + 1, "L2_inv": d * d + 1, "L1": 1 / (d + 1), "L2": 1 / (d * d + 1)}[kind]


def _case(B, M, D, *, seed=0, dtype=F64, ranges=True, excl=True):
    """Unit rows (logits of size ``scale``), integer labels with repeats, coefficients in [0, 1] (some 1),
    column ranges of which some are empty, exclusions of which some are none."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=1).mul(1.2).to(dtype)
    k = F.normalize(torch.randn(M, D, generator=g, dtype=F64), dim=1).to(dtype)
    y_row = torch.randint(0, 5, (B,), generator=g).double()
    y_col = torch.randint(0, 5, (M,), generator=g).double()
    coef = torch.rand(B, generator=g, dtype=F64)
    coef[::3] = 1.0
    if ranges:
        a = torch.randint(0, M + 1, (B,), generator=g)
        b = torch.randint(0, M + 1, (B,), generator=g)
        start, end = torch.minimum(a, b), torch.maximum(a, b)
        end[1::4] = start[1::4]  # empty ranges
    else:
        start, end = torch.zeros(B, dtype=torch.long), torch.full((B,), M)
    exclude = torch.randint(-1, M, (B,), generator=g) if excl else torch.full((B,), -1)
    return q, k, y_row, y_col, coef, start, end, exclude


def _call(q, k, s, args, kind, skip, backend):
    y_row, y_col, coef, start, end, exclude = args
    return label_lse(q, k, s, y_row, y_col, kind=kind, coef=coef, col_start=start, col_end=end, exclude=exclude,
                     skip_equal=skip, backend=backend)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [False, True])
def test_reference_matches_loop(kind, skip):
    q, k, *args = _case(7, 6, 4, seed=1)
    q.requires_grad_(True)
    k.requires_grad_(True)
    s = torch.tensor(1.7, dtype=F64, requires_grad=True)
    y_row, y_col, coef, start, end, exclude = args
    lse = _call(q, k, s, args, kind, skip, "reference")
    gamma = torch.randn(7, dtype=F64)
    for i in range(7):
        terms = [_w(float(coef[i]) * abs(float(y_row[i] - y_col[j])), kind) * torch.exp(s * (q[i] @ k[j]))
                 for j in range(6) if start[i] <= j < end[i] and j != exclude[i]
                 and not (skip and y_row[i] == y_col[j])]
        want = torch.log(sum(terms)) if terms else torch.tensor(-math.inf, dtype=F64)
        torch.testing.assert_close(lse[i], want)
    assert torch.isinf(lse).any() and torch.isfinite(lse).any()  # the case has empty and non-empty rows
    # the backward formula of the module docstring, against autograd of the dense version
    dq, dk, ds = torch.autograd.grad(torch.where(torch.isfinite(lse), lse * gamma, 0).sum(), [q, k, s])
    G = q.detach() @ k.detach().T
    ok = torch.stack([torch.tensor([bool(start[i] <= j < end[i] and j != exclude[i]
                                         and not (skip and y_row[i] == y_col[j])) for j in range(6)])
                      for i in range(7)])
    W = torch.log(_w(coef[:, None] * (y_row[:, None] - y_col[None, :]).abs(), kind))
    P = torch.where(ok, torch.exp(s.detach() * G + W - torch.where(torch.isfinite(lse), lse, 0).detach()[:, None]), 0)
    dG = gamma[:, None] * s.detach() * P
    torch.testing.assert_close(dq, dG @ k.detach())
    torch.testing.assert_close(dk, dG.T @ q.detach())
    torch.testing.assert_close(ds, (gamma[:, None] * P * G).sum())


SHAPES = [
    (37, 29, 20),  # ragged against the interpreter's 16-wide tiles, D not a power of two
    (70, 67, 5),   # across the CPU kernel's 64-row/64-column blocks
    (1, 1, 8),     # B = 1, M = 1
    (5, 40, 3),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind, skip", [("L1_inv", True), ("L2_inv", False), ("L1", False), ("L2", True)])
def test_kernel_matches_reference(backend, dtype, shape, kind, skip):
    if dtype == F64 and backend == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    B, M, D = shape
    q, k, *args = _case(B, M, D, seed=B + M)
    scale = 6.0
    fn = lambda q, k, s, **kw: _call(q, k, s, args, kind, skip, **kw).nan_to_num(neginf=-1e4)  # noqa: E731
    q, k = q.requires_grad_(), k.requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    compare_with_reference(fn, [q, k, s], backend=backend, dtype=dtype, sharpness=scale)


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_matches_reference_without_ranges(backend):
    """Default ranges and no exclusion: every row has candidates; the tile loops see full rows."""
    q, k, *args = _case(33, 35, 24, seed=4, ranges=False, excl=False)
    fn = lambda q, k, s, **kw: _call(q, k, s, args, "L1_inv", False, **kw)  # noqa: E731
    compare_with_reference(fn, [q.requires_grad_(), k.requires_grad_(), torch.tensor(2.0, requires_grad=True)],
                           backend=backend, dtype=torch.float32, sharpness=2.0)


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] == "cpu"])
def test_cpu_float64_gradcheck(backend):
    q, k, *args = _case(6, 5, 3, seed=3)
    s = torch.tensor(0.9, dtype=F64, requires_grad=True)
    for kind, skip in (("L1_inv", False), ("L2", True)):
        torch.autograd.gradcheck(
            lambda q, k, s: _call(q, k, s, args, kind, skip, backend).nan_to_num(neginf=0.0),
            (q.clone().requires_grad_(), k.clone().requires_grad_(), s))


def _run(backend, q, k, args, kind, skip):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(3.0, requires_grad=True)
    lse = _call(q, k, s, args, kind, skip, backend)
    g = torch.linspace(-1, 2, lse.numel())
    torch.where(torch.isfinite(lse), lse * g, 0).sum().backward()
    return lse, q.grad, k.grad, s.grad


@pytest.mark.parametrize("backend", FUSED)
def test_poisoned_outputs_are_all_written(backend):
    """Outputs and gradient buffers filled with NaN before the kernels run come back finite (lse −inf only
    on the rows with nothing allowed)."""
    q, k, *args = _case(21, 18, 9, seed=5, dtype=torch.float32)
    ref = _call(q.double(), k.double(), 3.0, args, "L2_inv", True, "reference")
    if backend == "triton":
        from contrastive_ops.backends._triton import tiles

        old, tiles.POISON_OUTPUTS = tiles.POISON_OUTPUTS, True
        try:
            lse, dq, dk, ds = _run(backend, q, k, args, "L2_inv", True)
        finally:
            tiles.POISON_OUTPUTS = old
    else:
        with nan_filled_memory():
            lse, dq, dk, ds = _run(backend, q, k, args, "L2_inv", True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)) and torch.isinf(ref).any()
    assert not lse.isnan().any()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(ds)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    q, k, *args = _case(70, 67, 12, seed=6, dtype=torch.float32)
    a = _run(backend, q, k, args, "L1", True)
    b = _run(backend, q, k, args, "L1", True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", FUSED)
def test_labels_and_coef_get_no_gradient_and_inputs_unchanged(backend):
    q, k, y_row, y_col, coef, start, end, exclude = _case(9, 8, 4, seed=7, dtype=torch.float32)
    y_row, y_col, coef = (t.float().requires_grad_(True) for t in (y_row, y_col, coef))
    before = [t.detach().clone() for t in (q, k, y_row, y_col, coef)]
    q.requires_grad_(True)
    lse = label_lse(q, k, 1.0, y_row, y_col, kind="L1_inv", coef=coef, backend=backend)
    lse.sum().backward()
    assert y_row.grad is None and y_col.grad is None and coef.grad is None
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (q, k, y_row, y_col, coef)))


def test_cuda_backend_does_not_list_it():
    from contrastive_ops.backends import _cext

    assert "label_lse" not in _cext.PRIMITIVES  # the table the "cuda" backend exposes
    assert "label_lse" in _cext.CPU_ONLY_PRIMITIVES
    assert {"label_lse_fwd", "label_lse_bwd"} <= set(_cext.CPU_ONLY_OPS)
    if backends.available_backends()["cuda"][0]:
        assert not backends.has_primitive("cuda", "label_lse")


@pytest.mark.parametrize("kw, match", [
    (dict(kind="L3"), "kind must be one of"),
    (dict(kind=4), "kind must be one of"),
    (dict(kind=1.0), "kind must be one of"),
    (dict(kind="L1", coef=torch.ones(3)), r"coef must have shape \(4,\)"),
    (dict(kind="L1", exclude=torch.zeros(5, dtype=torch.long)), r"exclude must have shape \(4,\)"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        label_lse(torch.randn(4, 3), torch.randn(5, 3), 1.0, torch.zeros(4), torch.zeros(5), backend="reference",
                  **kw)
    with pytest.raises(ValueError, match=r"y_col must have shape \(5,\)"):
        label_lse(torch.randn(4, 3), torch.randn(5, 3), 1.0, torch.zeros(4), torch.zeros(4), kind=0,
                  backend="reference")


def test_reference_is_exact_in_float64():
    """The dense reference in float64 equals the float64 formula with weights multiplied in (not logs added)."""
    q, k, *args = _case(5, 7, 3, seed=8, ranges=False, excl=False)
    y_row, y_col, coef = args[:3]
    lse = label_lse_reference(q, k, torch.tensor(2.0, dtype=F64), y_row, y_col, coef,
                              torch.zeros(5, dtype=torch.int32), torch.full((5,), 7, dtype=torch.int32),
                              torch.full((5,), -1, dtype=torch.int32), 1, False)
    d = coef[:, None] * (y_row[:, None] - y_col[None, :]).abs()
    torch.testing.assert_close(lse, torch.log(((d * d + 1) * torch.exp(2.0 * q @ k.T)).sum(1)), rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_q_is_k(backend):
    """One tensor as anchors and candidates (SupReMix's real pairs): its gradient is dq + dk."""
    _, k, y_row, y_col, coef, start, end, exclude = _case(13, 13, 6, seed=9, dtype=torch.float32)
    args = (y_col, y_col, coef, start, end, exclude)  # the rows' labels are the columns'
    fn = lambda z, s, **kw: _call(z, z, s, args, "L1_inv", False, **kw).nan_to_num(neginf=-1e4)  # noqa: E731
    compare_with_reference(fn, [k.requires_grad_(), torch.tensor(3.0, requires_grad=True)], backend=backend,
                           dtype=torch.float32, sharpness=3.0)
