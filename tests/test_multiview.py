"""mv_infonce / mv_dhel: references against literal loops and the official formulation,
fused compositions on the dense core against the references, kernel backends, bad input."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import _present_first as present_first
from contrastive_ops.losses import multiview as mv
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64


@pytest.fixture(params=[False, True], ids=["eager_cut", "static"])
def static_lists(request, monkeypatch):
    """The fused compositions' index lists cut to the present entries (eager default) or whole
    (static length, as under torch.compile, absent entries with empty ranges)."""
    monkeypatch.setattr(present_first, "STATIC", request.param)
    return request.param


def _unit(x, normalize=True):
    return F.normalize(x, dim=-1, eps=1e-12) if normalize else x


def _lse(terms):
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def _masks(N, V, kind, gen=None):
    """None, a random mask, or one with instances of 0/1 present views and a view with one instance."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(N * 31 + V)
    m = torch.rand(N, V, generator=g) > 0.35
    if kind == "hard":
        m[0] = False  # no view
        if N > 1:
            m[1] = False
            m[1, V - 1] = True  # one view: stays a negative, leaves the mean
        if N > 2:
            m[2] = True
        m[:, 0] = False
        m[N - 1, 0] = True  # view 0 holds a single instance: its MV-DHEL term has an empty set
    return m


# ------------------------------------------------------------------------------------------
# Literal loops (float64), following the formulas term by term
# ------------------------------------------------------------------------------------------


def loop_mv_infonce(x, tau, mask=None, normalize=True):
    """x (N, V, D).  Returns (per-instance values, counted flags)."""
    N, V, _ = x.shape
    u = _unit(x.double(), normalize)
    pres = [[mask is None or bool(mask[i, l]) for l in range(V)] for i in range(N)]
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    vals, counted = [], []
    for i in range(N):
        P = [l for l in range(V) if pres[i][l]]
        if len(P) < 2:
            vals.append(0.0)
            counted.append(False)
            continue
        num = [s(u[i, l], u[i, m]) for l in P for m in P if l != m]
        den = [s(u[i, l], u[j, m]) for l in P for j in range(N) for m in range(V)
               if pres[j][m] and (j, m) != (i, l)]
        vals.append(-_lse(num) + _lse(den))
        counted.append(True)
    return torch.tensor(vals, dtype=F64), torch.tensor(counted)


def loop_pairwise(x, tau, mask=None, normalize=True):
    """Returns (mean over ordered pairs of the per-pair mean CE, per-instance shares, counted)."""
    N, V, _ = x.shape
    u = _unit(x.double(), normalize)
    pres = lambda i, l: mask is None or bool(mask[i, l])  # noqa: E731
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    pair_means, ce_of = [], []
    for l, m in itertools.permutations(range(V), 2):
        idx = [i for i in range(N) if pres(i, l) and pres(i, m)]
        if not idx:
            continue
        ces = {i: -s(u[i, l], u[i, m]) + _lse([s(u[i, l], u[j, m]) for j in idx]) for i in idx}
        pair_means.append(sum(ces.values()) / len(idx))
        ce_of.append((ces, len(idx)))
    counted = [sum(pres(i, l) for l in range(V)) >= 2 for i in range(N)]
    cnt = sum(counted)
    shares = [cnt * sum(c[i] / n for c, n in ce_of if i in c) / max(len(pair_means), 1) for i in range(N)]
    mean = sum(pair_means) / len(pair_means) if pair_means else 0.0
    return mean, torch.tensor(shares, dtype=F64), torch.tensor(counted)


def loop_mv_dhel(x, tau, mask=None, normalize=True):
    N, V, _ = x.shape
    u = _unit(x.double(), normalize)
    pres = lambda i, l: mask is None or bool(mask[i, l])  # noqa: E731
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    vals, counted = [], []
    for i in range(N):
        P = [l for l in range(V) if pres(i, l)]
        if len(P) < 2:
            vals.append(0.0)
            counted.append(False)
            continue
        align = _lse([s(u[i, l], u[i, m]) for a, l in enumerate(P) for m in P[a + 1:]])
        unif = 0.0
        for l in P:
            terms = [s(u[i, l], u[j, l]) for j in range(N) if j != i and pres(j, l)]
            if terms:  # a view term over an empty set is left out
                unif += _lse(terms)
        vals.append(-align + unif)
        counted.append(True)
    return torch.tensor(vals, dtype=F64), torch.tensor(counted)


def official_mv_infonce(x, tau):
    """The official MV-InfoNCE code: the library's transcription, run in float64."""
    return mv.mv_infonce_released(x.double(), tau)


def official_mv_dhel(x, tau):
    """MV-DHEL in the official product form pos / Π_l neg_l (fine in float64 at these sizes)."""
    return mv.mv_dhel_released(x.double(), tau, product=True)


# ------------------------------------------------------------------------------------------
# References against loops and the official formulation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [2, 3, 5])
@pytest.mark.parametrize("mask_kind", ["none", "random", "hard"])
@pytest.mark.parametrize("normalize", [True, False])
def test_mv_infonce_reference_matches_loop(V, mask_kind, normalize):
    N = 6
    x = torch.randn(N, V, 4, dtype=F64) * (1 if normalize else 0.4)
    mask = _masks(N, V, mask_kind)
    vals, counted = loop_mv_infonce(x, 0.2, mask, normalize)
    kw = dict(mask=mask, normalize=normalize, backend="reference")
    torch.testing.assert_close(co.mv_infonce(x, 0.2, reduction="none", **kw), vals)
    torch.testing.assert_close(co.mv_infonce(x, 0.2, reduction="sum", **kw), vals.sum())
    torch.testing.assert_close(co.mv_infonce(x, 0.2, **kw), vals.sum() / max(int(counted.sum()), 1))


@pytest.mark.parametrize("V", [2, 3, 5])
@pytest.mark.parametrize("mask_kind", ["none", "random", "hard"])
def test_mv_infonce_pairwise_reference_matches_loop(V, mask_kind):
    N = 6
    x = torch.randn(N, V, 4, dtype=F64)
    mask = _masks(N, V, mask_kind)
    mean, shares, counted = loop_pairwise(x, 0.3, mask)
    kw = dict(mask=mask, variant="pairwise", backend="reference")
    torch.testing.assert_close(co.mv_infonce(x, 0.3, **kw), torch.tensor(mean, dtype=F64))
    torch.testing.assert_close(co.mv_infonce(x, 0.3, reduction="none", **kw), shares)
    torch.testing.assert_close(co.mv_infonce(x, 0.3, reduction="sum", **kw), shares.sum())


def test_mv_infonce_pairwise_none_is_mean_over_pairs_without_mask():
    x = torch.randn(5, 3, 4, dtype=F64)
    u = F.normalize(x, dim=-1)
    ce = torch.stack([F.cross_entropy(u[:, l] @ u[:, m].T / 0.3, torch.arange(5), reduction="none")
                      for l, m in itertools.permutations(range(3), 2)]).mean(0)
    torch.testing.assert_close(co.mv_infonce(x, 0.3, variant="pairwise", reduction="none", backend="reference"), ce)


@pytest.mark.parametrize("V", [2, 3, 6])
def test_mv_infonce_matches_official_formulation(V):
    x = torch.randn(9, V, 7, dtype=F64)
    torch.testing.assert_close(co.mv_infonce(x, 0.15, backend="reference"), official_mv_infonce(x, 0.15))
    seq = list(x.unbind(1))
    torch.testing.assert_close(co.mv_infonce(seq, 0.15, backend="reference"), official_mv_infonce(x, 0.15))


@pytest.mark.parametrize("V", [2, 3, 5])
@pytest.mark.parametrize("mask_kind", ["none", "random", "hard"])
def test_mv_dhel_reference_matches_loop(V, mask_kind):
    N = 6
    x = torch.randn(N, V, 4, dtype=F64)
    mask = _masks(N, V, mask_kind)
    vals, counted = loop_mv_dhel(x, 0.2, mask)
    kw = dict(mask=mask, backend="reference")
    torch.testing.assert_close(co.mv_dhel(x, 0.2, reduction="none", **kw), vals)
    torch.testing.assert_close(co.mv_dhel(x, 0.2, **kw), vals.sum() / max(int(counted.sum()), 1))


@pytest.mark.parametrize("V", [2, 4])
def test_mv_dhel_matches_official_product_form(V):
    x = torch.randn(7, V, 5, dtype=F64)
    torch.testing.assert_close(co.mv_dhel(x, 0.5, backend="reference"), official_mv_dhel(x, 0.5))
    # The sum-of-logs form (official CL_2, what the benchmarks time) is the same value.
    torch.testing.assert_close(mv.mv_dhel_released(x, 0.5), official_mv_dhel(x, 0.5))


def test_mv_dhel_two_views_is_dhel():
    x = torch.randn(8, 2, 5, dtype=F64)
    torch.testing.assert_close(co.mv_dhel(x, 0.3, reduction="none", backend="reference"),
                               co.dhel_loss(x[:, 0], x[:, 1], 0.3, reduction="none", backend="reference"))


@pytest.mark.parametrize("fn", ["mv", "pairwise", "dhel"])
def test_no_instance_counts_gives_zero_in_graph(fn, static_lists):
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:, 1] = True  # every instance has a single view
    for backend in ("reference", None):
        if fn == "dhel":
            f = mv.mv_dhel_reference if backend else mv._fused_mv_dhel
            kw = {}
        else:
            f = mv.mv_infonce_reference if backend else mv._fused_mv_infonce
            kw = dict(variant=fn)
        if backend is None:
            kw["backend"] = "reference"
        loss = f(x.transpose(0, 1), torch.tensor(0.2, dtype=F64), mask, **kw)
        assert loss.item() == 0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, x)
        assert torch.count_nonzero(g) == 0


# ------------------------------------------------------------------------------------------
# Gradcheck of the references (float64, features and temperature, masks)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mv", "pairwise", "dhel"])
@pytest.mark.parametrize("mask_kind", ["none", "hard"])
def test_reference_gradcheck(variant, mask_kind):
    N, V = 5, 3
    x = torch.randn(N, V, 4, dtype=F64, requires_grad=True)
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)
    mask = _masks(N, V, mask_kind)

    def f(x, t):
        if variant == "dhel":
            return co.mv_dhel(x, t, mask=mask, reduction="none", backend="reference")
        return co.mv_infonce(x, t, mask=mask, variant=variant, reduction="none", backend="reference")

    assert torch.autograd.gradcheck(f, (x, t))


# ------------------------------------------------------------------------------------------
# Fused compositions with the dense core against the references
# ------------------------------------------------------------------------------------------


def _run(f, x, t, mask, reduction, **kw):
    xx = x.detach().clone().requires_grad_(True)
    tt = t.detach().clone().requires_grad_(True)
    out = f(xx.transpose(0, 1), tt, mask, reduction=reduction, **kw)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)) if out.dim() \
        else torch.tensor(2.5, dtype=out.dtype)
    gx, gt = torch.autograd.grad((out * w).sum(), (xx, tt), allow_unused=True)
    return out.detach(), gx, (torch.zeros_like(tt) if gt is None else gt)


@pytest.mark.parametrize("V", [2, 3, 8])
@pytest.mark.parametrize("N", [1, 2, 13])
@pytest.mark.parametrize("mask_kind", ["none", "random", "hard"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["mv", "pairwise", "dhel"])
def test_fused_with_dense_core_equals_reference(V, N, mask_kind, reduction, variant, static_lists):
    x = torch.randn(N, V, 6, dtype=F64)
    t = torch.tensor(0.25, dtype=F64)
    mask = _masks(N, V, mask_kind)
    if variant == "dhel":
        ref, fused, kw = mv.mv_dhel_reference, mv._fused_mv_dhel, {}
    else:
        ref, fused, kw = mv.mv_infonce_reference, mv._fused_mv_infonce, dict(variant=variant)
    r = _run(ref, x, t, mask, reduction, **kw)
    k = _run(fused, x, t, mask, reduction, backend="reference", **kw)
    for a, b, what in zip(k, r, ("loss", "grad features", "grad temperature")):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")


def test_fused_fp32_returns_fp32_and_input_dtype_grads():
    x = torch.randn(5, 3, 4, dtype=torch.float16, requires_grad=True)
    loss = mv._fused_mv_infonce(x.transpose(0, 1), torch.tensor(0.2), None, backend="reference")
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float16


# ------------------------------------------------------------------------------------------
# Kernel backends against the reference
# ------------------------------------------------------------------------------------------


def _mvi(x, mask, *, backend, **kw):
    return co.mv_infonce(x, mask=mask, backend=backend, **kw)


def _mvd(x, mask, *, backend, **kw):
    return co.mv_dhel(x, mask=mask, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [2, 3, 8])
@pytest.mark.parametrize("mask_kind", ["none", "hard"])
@pytest.mark.parametrize("case", ["mv", "pairwise", "dhel"])
def test_kernel_backends_match_reference(backend, dtype, V, mask_kind, case):
    N = 37
    x = torch.randn(N, V, 24, device=DEVICE, requires_grad=True)
    mask = _masks(N, V, mask_kind)
    mask = None if mask is None else mask.to(DEVICE)
    fn, kw = (_mvd, {}) if case == "dhel" else (_mvi, dict(variant=case))
    # "pairwise" sums 2(V-1) cross-entropies into each gradient entry, each rounded to the input dtype first
    terms = 2 * (V - 1) if case == "pairwise" else 1
    # the mean is over the instances with two views or more: each one's upstream gradient is 1/count, not 1/N
    counted = N if mask is None else max(1, int((mask.sum(1) >= 2).sum()))
    terms *= N / counted
    for reduction in ("mean", "none"):
        compare_with_reference(fn, [x, mask], backend=backend, dtype=dtype, temperature=0.2,
                               sharpness=terms / 0.2, normalized=True, reduction=reduction, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("mask_kind", ["hard", "empty"])
@pytest.mark.parametrize("case", ["mv", "pairwise", "dhel"])
def test_kernel_backends_static_lists_match_reference(backend, V, mask_kind, case, monkeypatch):
    """Whole static-length lists (as under torch.compile): absent anchors with empty ranges in the
    kernels give the reference's values and zero gradients, also when no view is present."""
    monkeypatch.setattr(present_first, "STATIC", True)
    N = 37
    x = torch.randn(N, V, 24, device=DEVICE, requires_grad=True)
    mask = _masks(N, V, "hard") if mask_kind == "hard" else torch.zeros(N, V, dtype=torch.bool)
    fn, kw = (_mvd, {}) if case == "dhel" else (_mvi, dict(variant=case))
    for reduction in ("mean", "none"):
        compare_with_reference(fn, [x, mask.to(DEVICE)], backend=backend, dtype=torch.float32, temperature=0.2,
                               reduction=reduction, **kw)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["mv_infonce", "mv_dhel"])
def fn(request):
    return getattr(co, request.param)


def test_integer_features(fn):
    with pytest.raises(TypeError, match=r"features.*\(4, 3, 5\)"):
        fn(torch.ones(4, 3, 5, dtype=torch.long))


def test_wrong_rank(fn):
    with pytest.raises(ValueError, match=r"features.*\(4, 5\)"):
        fn(torch.randn(4, 5))


def test_single_view(fn):
    with pytest.raises(ValueError, match=r"features.*at least 2 views.*\(4, 1, 5\)"):
        fn(torch.randn(4, 1, 5))


def test_single_view_sequence(fn):
    with pytest.raises(ValueError, match=r"features.*at least 2 views"):
        fn([torch.randn(4, 5)])


def test_sequence_shape_mismatch(fn):
    with pytest.raises(ValueError, match=r"features\[1\].*\(3, 5\).*\(4, 5\)"):
        fn([torch.randn(4, 5), torch.randn(3, 5)])


def test_sequence_dtype_mismatch(fn):
    with pytest.raises(ValueError, match=r"features\[1\].*float64"):
        fn([torch.randn(4, 5), torch.randn(4, 5, dtype=F64)])


def test_sequence_device_mismatch(fn):
    with pytest.raises(ValueError, match=r"features\[1\].*meta"):
        fn([torch.randn(4, 5), torch.randn(4, 5, device="meta")])


def test_empty_batch(fn):
    with pytest.raises(ValueError, match=r"features.*\(0, 3, 5\)"):
        fn(torch.randn(0, 3, 5))


@pytest.mark.parametrize("t", [0.0, -0.1, torch.tensor(0.0)])
def test_bad_temperature(fn, t):
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.randn(4, 3, 5), t)


def test_mask_wrong_shape(fn):
    with pytest.raises(ValueError, match=r"mask.*\(4, 3\).*\(3, 4\)"):
        fn(torch.randn(4, 3, 5), mask=torch.ones(3, 4, dtype=torch.bool))


def test_mask_wrong_dtype(fn):
    with pytest.raises(ValueError, match=r"mask.*bool.*int64"):
        fn(torch.randn(4, 3, 5), mask=torch.ones(4, 3, dtype=torch.long))


def test_mask_wrong_device(fn):
    with pytest.raises(ValueError, match=r"mask.*meta"):
        fn(torch.randn(4, 3, 5), mask=torch.ones(4, 3, dtype=torch.bool, device="meta"))


def test_unknown_reduction(fn):
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        fn(torch.randn(4, 3, 5), reduction="avg")


def test_unknown_backend(fn):
    with pytest.raises(ValueError, match="backend.*'fast'"):
        fn(torch.randn(4, 3, 5), backend="fast")


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant.*'pwe'"):
        co.mv_infonce(torch.randn(4, 3, 5), variant="pwe")


def test_process_group_without_distributed(fn):
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        fn(torch.randn(4, 3, 5), process_group=object())


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_inputs_not_modified(fn, backend):
    x = torch.randn(6, 3, 5, requires_grad=True)
    mask = _masks(6, 3, "hard")
    x0, m0 = x.detach().clone(), mask.clone()
    if backend == "fused":
        f = mv._fused_mv_dhel if fn is co.mv_dhel else mv._fused_mv_infonce
        loss = f(x.transpose(0, 1), torch.tensor(0.2), mask, backend="reference")
    else:
        loss = fn(x, mask=mask, backend="reference")
    loss.backward()
    assert torch.equal(x.detach(), x0) and torch.equal(mask, m0)
