"""The label_lse primitive (row LSE of similarities plus a per-pair label-distance log-weight): the dense
reference against a float64 loop (value and the backward formula), every kernel backend that has it against
the reference (forward and the gradients of q, k and scale; float64 on CPU, fp32, fp16, bf16; ragged sizes
across the tiles, every weight kind, column ranges with empty ones, exclude, skip_equal), NaN-poisoned
outputs, determinism, bad input, the "cuda" backend without it.  Mixture mode (λ_ij drawn per pair by the
counter-based generator): the generator's uniforms bitwise equal in torch, C++ and Triton, λ's Beta moments,
the kernels' λ equal to ``pair_lambda``, and the mode's forward and gradients (q, k, scale, row term) as
above."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_ops import backends
from contrastive_ops.primitives.label_lse import (KINDS, label_lse, label_lse_reference, pair_key, pair_lambda,
                                                  pair_uniform)
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


# ---------------------------------------------------------------------------- mixture mode (λ per pair)


def _ids_case(R, C, seed=0):
    """Row ids from all of [0, 2**31) (the top bit of the hash inputs exercised) and shuffled column ids."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 2 ** 31 - 1, (R,), generator=g, dtype=torch.int64)
    rows[:3] = torch.tensor([0, 1, 2 ** 31 - 1])[:R]
    cols = torch.randperm(C, generator=g) * 7919
    return rows.to(torch.int32), cols.to(torch.int32)


def _python_hash(seed, i, j, t):
    """The generator on Python ints (the spec the tensor versions implement)."""
    m = 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = h * 0x85EBCA6B & m
        h ^= h >> 13
        h = h * 0xC2B2AE35 & m
        return h ^ (h >> 16)

    key = fmix(fmix(seed ^ (i * 0x9E3779B1 & m)) ^ (j * 0x7FEB352D & m))
    return ((fmix(key ^ ((t + 1) * 0x846CA68B & m)) >> 9) + 0.5) * 2.0 ** -23


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 31 - 2])
def test_generator_uniforms_bitwise_equal(backend, seed):
    """The same (seed, i, k, t) gives bitwise the same uniform in torch, in C++ and in Triton."""
    rows, cols = _ids_case(37, 29, seed=seed % 97)
    key = pair_key(seed, rows, cols)
    for t in (0, 1, 5, 9, 31):
        want = pair_uniform(key, t)
        if backend == "cpu":
            from contrastive_ops.backends._cext import ensure_loaded

            ensure_loaded()
            got = torch.ops.contrastive_ops.label_lse_uniforms(seed, rows, cols, t)
        else:
            from contrastive_ops.backends._triton.label_lse import pair_uniforms

            got = pair_uniforms(seed, rows, cols, t)
        assert torch.equal(got, want), (t, (got != want).sum())
        assert bool(((want > 0) & (want < 1)).all())
    for i, j, t in ((0, 0, 0), (3, 5, 2), (1, 28, 9)):
        assert pair_uniform(key, t)[i, j].item() == _python_hash(seed, int(rows[i]), int(cols[j]), t)


@pytest.mark.parametrize("beta, mean, var", [((2, 8), 0.2, 16 / 1100), ((3, 3), 0.5, 1 / 28), ((1, 1), 0.5, 1 / 12)])
def test_generator_lambda_moments(beta, mean, var):
    """λ over 102,400 pairs has Beta(a, b)'s mean and variance (5 standard errors), and λ of neighbouring
    pairs and of two seeds are uncorrelated."""
    rows, cols = torch.arange(320), torch.arange(320)
    lam = pair_lambda(7, rows, cols, beta, torch.float64)
    n = lam.numel()
    assert abs(float(lam.mean()) - mean) < 5 * math.sqrt(var / n)
    # the sample variance's standard error, from the distribution's own fourth central moment
    m4 = float(((lam - mean) ** 4).mean())
    assert abs(float(lam.var()) - var) < 5 * math.sqrt((m4 - var ** 2) / n)
    a, b = lam[:, :-1].flatten(), lam[:, 1:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())
    a, b = lam[:-1].flatten(), lam[1:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())
    lam2 = pair_lambda(8, rows, cols, beta, torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([lam.flatten(), lam2.flatten()]))[0, 1])) < 5 / math.sqrt(n)
    # Kolmogorov–Smirnov against the exact CDF (integer a, b: I_x(a, b) = P(Binomial(a + b − 1, x) >= a));
    # the bound is the statistic's 1e-6 quantile
    x, _ = lam.flatten().sort()
    nn = beta[0] + beta[1] - 1
    cdf = sum(math.comb(nn, j) * x ** j * (1 - x) ** (nn - j) for j in range(beta[0], nn + 1))
    ecdf = torch.arange(1, n + 1, dtype=F64) / n
    ks = float(torch.maximum((cdf - ecdf).abs(), (cdf - ecdf + 1 / n).abs()).max())
    assert ks < math.sqrt(math.log(2e6) / (2 * n))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kernels_draw_the_generators_lambda(backend, dtype):
    """With q = 0, coef = 0 and one allowed candidate per row, lse_i = λ_ij·1: the kernels' λ equals
    ``pair_lambda`` (to rounding of the logs) for every (row, candidate), through the forward."""
    if dtype == F64 and backend == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    B, M = 23, 19
    rows, cols = _ids_case(B, M, seed=3)
    want = pair_lambda(99, rows, cols, (2, 8), acc := (F64 if dtype == F64 else torch.float32))
    got = torch.empty(B, M, dtype=acc)
    q, k = torch.zeros(B, 4, dtype=dtype), torch.randn(M, 4, dtype=dtype)
    for j in range(M):
        got[:, j] = label_lse(q, k, 1.0, torch.zeros(B), torch.ones(M), kind=0, coef=0.0, col_start=j, col_end=j + 1,
                              row_term=torch.ones(B, dtype=dtype), seed=99, row_ids=rows, col_ids=cols,
                              backend=backend)
    torch.testing.assert_close(got, want, rtol=8 * torch.finfo(acc).eps, atol=0)


def _mix_lse(q, k, s, b, args, kind, skip, *, backend, seed=4242, beta=(2, 8), ids=None):
    y_row, y_col, coef, start, end, exclude = args
    rows, cols = ids if ids is not None else _ids_case(q.shape[0], k.shape[0], seed=q.shape[0])
    return label_lse(q, k, s, y_row, y_col, kind=kind, coef=coef, col_start=start, col_end=end, exclude=exclude,
                     skip_equal=skip, row_term=b, seed=seed, beta=beta, row_ids=rows, col_ids=cols, backend=backend)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [False, True])
def test_mixture_reference_matches_loop(kind, skip):
    """Mixture mode: the dense reference against a float64 loop over pairs with λ from ``pair_lambda``, and
    the backward formula (dq, dk, dscale with the (1 − λ) factor, db = γ·Σ P·λ) against autograd."""
    B, M = 7, 6
    q, k, *args = _case(B, M, 4, seed=11)
    y_row, y_col, coef, start, end, exclude = args
    b = torch.randn(B, dtype=F64, requires_grad=True)
    q.requires_grad_(True)
    k.requires_grad_(True)
    s = torch.tensor(1.7, dtype=F64, requires_grad=True)
    rows, cols = _ids_case(B, M, seed=5)
    lam = pair_lambda(31, rows, cols, (3, 5), F64)
    lse = _mix_lse(q, k, s, b, args, kind, skip, backend="reference", seed=31, beta=(3, 5), ids=(rows, cols))
    ok = torch.stack([torch.tensor([bool(start[i] <= j < end[i] and j != exclude[i]
                                         and not (skip and y_row[i] == y_col[j])) for j in range(M)])
                      for i in range(B)])
    for i in range(B):
        terms = [_w((1 - float(lam[i, j])) * float(coef[i]) * abs(float(y_row[i] - y_col[j])), kind)
                 * torch.exp(lam[i, j] * b[i] + (1 - lam[i, j]) * s * (q[i] @ k[j])) for j in range(M) if ok[i, j]]
        want = torch.log(sum(terms)) if terms else torch.tensor(-math.inf, dtype=F64)
        torch.testing.assert_close(lse[i], want)
    assert torch.isinf(lse).any() and torch.isfinite(lse).any()
    gamma = torch.randn(B, dtype=F64)
    dq, dk, ds, db = torch.autograd.grad(torch.where(torch.isfinite(lse), lse * gamma, 0).sum(), [q, k, s, b])
    G = q.detach() @ k.detach().T
    W = torch.log(_w((1 - lam) * coef[:, None] * (y_row[:, None] - y_col[None, :]).abs(), kind))
    S = lam * b.detach()[:, None] + (1 - lam) * s.detach() * G + W
    P = torch.where(ok, torch.exp(S - torch.where(torch.isfinite(lse), lse, 0).detach()[:, None]), 0)
    dG = gamma[:, None] * s.detach() * (1 - lam) * P
    torch.testing.assert_close(dq, dG @ k.detach())
    torch.testing.assert_close(dk, dG.T @ q.detach())
    torch.testing.assert_close(ds, (gamma[:, None] * P * (1 - lam) * G).sum())
    torch.testing.assert_close(db, gamma * (P * lam).sum(1))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind, skip", [("L1_inv", True), ("L2", False)])
def test_mixture_kernel_matches_reference(backend, dtype, shape, kind, skip):
    """Mixture mode on the kernels against the reference: forward and the gradients of q, k, scale and the
    row term (the row term at the logits' size, so λ·b matters)."""
    if dtype == F64 and backend == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    B, M, D = shape
    q, k, *args = _case(B, M, D, seed=B + M + 1)
    scale = 6.0
    b = (torch.rand(B, generator=torch.Generator().manual_seed(B), dtype=F64) * 2 - 1) * scale
    fn = lambda q, k, s, b, **kw: _mix_lse(q, k, s, b, args, kind, skip, **kw).nan_to_num(neginf=-1e4)  # noqa: E731
    compare_with_reference(fn, [q.requires_grad_(), k.requires_grad_(), torch.tensor(scale, requires_grad=True),
                                b.requires_grad_()], backend=backend, dtype=dtype, sharpness=scale)


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] == "cpu"])
def test_mixture_cpu_float64_gradcheck(backend):
    q, k, *args = _case(6, 5, 3, seed=13)
    s = torch.tensor(0.9, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda q, k, s, b: _mix_lse(q, k, s, b, args, "L1_inv", True, backend=backend).nan_to_num(neginf=0.0),
        (q.clone().requires_grad_(), k.clone().requires_grad_(), s, b))


def _run_mix(backend, q, k, args, kind, skip):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(3.0, requires_grad=True)
    b = torch.linspace(-2, 3, q.shape[0]).requires_grad_(True)
    lse = _mix_lse(q, k, s, b, args, kind, skip, backend=backend)
    g = torch.linspace(-1, 2, lse.numel())
    torch.where(torch.isfinite(lse), lse * g, 0).sum().backward()
    return lse, q.grad, k.grad, s.grad, b.grad


@pytest.mark.parametrize("backend", FUSED)
def test_mixture_poisoned_outputs_are_all_written(backend):
    q, k, *args = _case(21, 18, 9, seed=15, dtype=torch.float32)
    ref = _run_mix("reference", q.double(), k.double(), args, "L2_inv", True)
    if backend == "triton":
        from contrastive_ops.backends._triton import tiles

        old, tiles.POISON_OUTPUTS = tiles.POISON_OUTPUTS, True
        try:
            out = _run_mix(backend, q, k, args, "L2_inv", True)
        finally:
            tiles.POISON_OUTPUTS = old
    else:
        with nan_filled_memory():
            out = _run_mix(backend, q, k, args, "L2_inv", True)
    lse = out[0]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[0])) and torch.isinf(ref[0]).any()
    assert not lse.isnan().any()
    for got, want in zip(out[1:], ref[1:]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
def test_mixture_deterministic_and_seeded(backend):
    """Same seed: bitwise the same outputs and gradients; another seed: other λ, another lse."""
    q, k, *args = _case(70, 67, 12, seed=16, dtype=torch.float32)
    a = _run_mix(backend, q, k, args, "L1", True)
    b = _run_mix(backend, q, k, args, "L1", True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    y_row, y_col, coef, start, end, exclude = args
    other = label_lse(q, k, 3.0, y_row, y_col, kind="L1", coef=coef, col_start=start, col_end=end, exclude=exclude,
                      skip_equal=True, row_term=torch.linspace(-2, 3, 70), seed=4243,
                      row_ids=_ids_case(70, 67, seed=70)[0], col_ids=_ids_case(70, 67, seed=70)[1], backend=backend)
    fin = torch.isfinite(a[0])
    assert (other[fin] - a[0][fin]).abs().max() > 1e-3


@pytest.mark.parametrize("kw, match", [
    (dict(seed=3), "belong to mixture mode"),
    (dict(row_term=torch.zeros(4)), "int seed"),
    (dict(row_term=torch.zeros(4), seed=-1), "int seed"),
    (dict(row_term=torch.zeros(4), seed=1.0), "int seed"),
    (dict(row_term=torch.zeros(3), seed=1), r"row_term must be a tensor of shape \(4,\)"),
    (dict(row_term=torch.zeros(4), seed=1, beta=(2.5, 8)), "beta must be integers"),
    (dict(row_term=torch.zeros(4), seed=1, beta=(20, 13)), "beta must be integers"),
    (dict(row_term=torch.zeros(4), seed=1, row_ids=torch.zeros(5, dtype=torch.long)), r"row_ids must be .*\(4,\)"),
    (dict(row_term=torch.zeros(4), seed=1, col_ids=torch.zeros(5)), r"col_ids must be an integer"),
    (dict(row_term=torch.zeros(4), seed=1, col_ids=-torch.ones(5, dtype=torch.long)), r"col_ids must lie in"),
])
def test_mixture_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        label_lse(torch.randn(4, 3), torch.randn(5, 3), 1.0, torch.zeros(4), torch.zeros(5), kind=0,
                  backend="reference", **kw)
