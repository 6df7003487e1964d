"""dcl_loss / dhel_loss: references against lightly's DCLLoss / DCLWLoss and a literal loop;
fused compositions with the dense core; kernel backends; bad input."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import decoupled as dc
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64


def _lse(terms):
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def loop_dhel(z1, z2, tau, include_augs=True, normalize=True):
    u = F.normalize(z1.double(), dim=-1) if normalize else z1.double()
    v = F.normalize(z2.double(), dim=-1) if normalize else z2.double()
    N = u.shape[0]
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    out = []
    for i in range(N):
        val = -s(u[i], v[i])
        if N > 1:
            val += _lse([s(u[i], u[j]) for j in range(N) if j != i])
            if include_augs:
                val += _lse([s(v[i], v[j]) for j in range(N) if j != i])
        out.append(val)
    return torch.tensor(out, dtype=F64)


def loop_dcl(z1, z2, tau, weights=None, normalize=True):
    u = F.normalize(z1.double(), dim=-1) if normalize else z1.double()
    v = F.normalize(z2.double(), dim=-1) if normalize else z2.double()
    N = u.shape[0]
    w = [1.0] * N if weights is None else weights.tolist()
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    out = []
    for i in range(N):
        l1 = -w[i] * s(u[i], v[i]) + _lse([s(u[i], u[j]) for j in range(N) if j != i]
                                          + [s(u[i], v[j]) for j in range(N) if j != i])
        l2 = -w[i] * s(u[i], v[i]) + _lse([s(v[i], v[j]) for j in range(N) if j != i]
                                          + [s(v[i], u[j]) for j in range(N) if j != i])
        out.append(0.5 * (l1 + l2))
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------------------------------
# Peers and loops
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("N", [2, 9])
def test_dcl_matches_lightly(weighted, N):
    from lightly.loss import DCLLoss, DCLWLoss

    z1 = torch.randn(N, 6, dtype=F64, requires_grad=True)
    z2 = torch.randn(N, 6, dtype=F64, requires_grad=True)
    ours = co.dcl_loss(z1, z2, 0.1, weighted=weighted, sigma=0.5, backend="reference")
    peer = DCLWLoss(temperature=0.1, sigma=0.5) if weighted else DCLLoss(temperature=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lightly copy-constructs its weights
        theirs = peer(z1, z2)
    torch.testing.assert_close(ours, theirs)
    g1 = torch.autograd.grad(ours * 3, (z1, z2))
    g2 = torch.autograd.grad(theirs * 3, (z1, z2))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_dcl_reference_matches_loop(weighted, normalize):
    z1, z2 = torch.randn(7, 5, dtype=F64) * 0.5, torch.randn(7, 5, dtype=F64) * 0.5
    w = None
    if weighted:  # weights on the (normalized when normalize) features, σ = 0.7
        a = F.normalize(z1, dim=-1) if normalize else z1
        b = F.normalize(z2, dim=-1) if normalize else z2
        w = 2 - 7 * torch.softmax((a * b).sum(-1) / 0.7, 0)
    expected = loop_dcl(z1, z2, 0.2, w, normalize)
    kw = dict(weighted=weighted, sigma=0.7, normalize=normalize, backend="reference")
    torch.testing.assert_close(co.dcl_loss(z1, z2, 0.2, reduction="none", **kw), expected)
    torch.testing.assert_close(co.dcl_loss(z1, z2, 0.2, reduction="sum", **kw), expected.sum())
    torch.testing.assert_close(co.dcl_loss(z1, z2, 0.2, **kw), expected.mean())


def test_dcl_weights_are_detached():
    z1 = torch.randn(6, 5, dtype=F64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=F64)
    w = 2 - 6 * torch.softmax((F.normalize(z1, dim=-1) * F.normalize(z2, dim=-1)).sum(-1).detach() / 0.5, 0)
    u, v = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    # Same weights as constants: the gradients agree only if the loss does not differentiate through them.
    Z = torch.cat([u, v])
    S = Z @ Z.T / 0.1
    i = torch.arange(12)
    allowed = (i[None] != i[:, None]) & (i[None] != ((i + 6) % 12)[:, None])
    lse = torch.logsumexp(S.masked_fill(~allowed, float("-inf")), 1)
    expected = (-w * (u * v).sum(-1) / 0.1 + 0.5 * (lse[:6] + lse[6:])).mean()
    ours = co.dcl_loss(z1, z2, 0.1, weighted=True, backend="reference")
    torch.testing.assert_close(torch.autograd.grad(ours, z1)[0], torch.autograd.grad(expected, z1)[0])


@pytest.mark.parametrize("include_augs", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N", [1, 2, 8])
def test_dhel_reference_matches_loop(include_augs, normalize, N):
    z1, z2 = torch.randn(N, 5, dtype=F64) * 0.5, torch.randn(N, 5, dtype=F64) * 0.5
    expected = loop_dhel(z1, z2, 0.3, include_augs, normalize)
    kw = dict(include_augs=include_augs, normalize=normalize, backend="reference")
    torch.testing.assert_close(co.dhel_loss(z1, z2, 0.3, reduction="none", **kw), expected)
    torch.testing.assert_close(co.dhel_loss(z1, z2, 0.3, **kw), expected.mean())


def test_dhel_matches_official_form():
    """DHEL-KCL computes −log(e^{s_ii} / (Σ_{j≠i} e^{s(u_i,u_j)} · Σ_{j≠i} e^{s(v_i,v_j)})), mean over i."""
    z1, z2 = torch.randn(8, 5, dtype=F64), torch.randn(8, 5, dtype=F64)
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    off = ~torch.eye(8, dtype=torch.bool)
    su = torch.exp(u @ u.T / 0.3).masked_select(off).view(8, 7).sum(-1)
    sv = torch.exp(v @ v.T / 0.3).masked_select(off).view(8, 7).sum(-1)
    pos = torch.exp((u * v).sum(-1) / 0.3)
    expected = -(torch.log(pos / (su * sv))).mean()
    torch.testing.assert_close(co.dhel_loss(z1, z2, 0.3, backend="reference"), expected)


@pytest.mark.parametrize("loss", ["dcl", "dclw", "dhel", "dhel_noaug"])
def test_reference_gradcheck(loss):
    z1 = torch.randn(5, 4, dtype=F64, requires_grad=True)
    z2 = torch.randn(5, 4, dtype=F64, requires_grad=True)
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)

    def f(z1, z2, t):
        if loss.startswith("dcl"):
            return co.dcl_loss(z1, z2, t, weighted=loss == "dclw", reduction="none", backend="reference")
        return co.dhel_loss(z1, z2, t, include_augs=loss == "dhel", reduction="none", backend="reference")

    if loss == "dclw":
        # The weights are detached, so finite differences of the features see them move:
        # check the temperature here and the feature gradients in test_dcl_weights_are_detached.
        assert torch.autograd.gradcheck(lambda t: f(z1.detach(), z2.detach(), t), (t,))
    else:
        assert torch.autograd.gradcheck(f, (z1, z2, t))


# ------------------------------------------------------------------------------------------
# Fused compositions with the dense core
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 13])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["dcl", "dclw", "dhel", "dhel_noaug", "dcl_raw", "dhel_raw"])
def test_fused_with_dense_core_equals_reference(N, reduction, case):
    z1 = torch.randn(N, 6, dtype=F64)
    z2 = torch.randn(N, 6, dtype=F64)
    if case.startswith("dcl"):
        ref, fused = dc.dcl_reference, dc._fused_dcl
        kw = dict(weighted=case == "dclw", sigma=torch.tensor(0.6, dtype=F64), normalize=case != "dcl_raw")
    else:
        ref, fused = dc.dhel_reference, dc._fused_dhel
        kw = dict(include_augs=case != "dhel_noaug", normalize=case != "dhel_raw")
    outs = []
    for f, extra in ((ref, {}), (fused, dict(backend="reference"))):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        t = torch.tensor(0.3, dtype=F64, requires_grad=True)
        out = f(a, b, t, reduction=reduction, **kw, **extra)
        w = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(3)) if out.dim() \
            else torch.tensor(-1.3, dtype=F64)
        outs.append((out.detach(),) + torch.autograd.grad((out * w).sum(), (a, b, t)))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y)


def _dcl(z1, z2, *, backend, **kw):
    return co.dcl_loss(z1, z2, backend=backend, **kw)


def _dhel(z1, z2, *, backend, **kw):
    return co.dhel_loss(z1, z2, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 37])
@pytest.mark.parametrize("case", ["dcl", "dclw", "dhel", "dhel_noaug"])
def test_kernel_backends_match_reference(backend, dtype, N, case):
    z1 = torch.randn(N, 24, device=DEVICE, requires_grad=True)
    z2 = torch.randn(N, 24, device=DEVICE, requires_grad=True)
    if case.startswith("dcl"):
        fn, kw = _dcl, dict(weighted=case == "dclw")
    else:
        fn, kw = _dhel, dict(include_augs=case == "dhel")
    for reduction in ("mean", "none"):
        compare_with_reference(fn, [z1, z2], backend=backend, dtype=dtype, temperature=0.2, reduction=reduction,
                               **kw)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["dcl_loss", "dhel_loss"])
def fn(request):
    return getattr(co, request.param)


def test_integer_features(fn):
    with pytest.raises(TypeError, match=r"z1.*\(4, 5\)"):
        fn(torch.ones(4, 5, dtype=torch.long), torch.randn(4, 5))


def test_wrong_rank(fn):
    with pytest.raises(ValueError, match=r"z2.*\(4, 5, 1\)"):
        fn(torch.randn(4, 5), torch.randn(4, 5, 1))


def test_shape_mismatch(fn):
    with pytest.raises(ValueError, match=r"z1 and z2.*\(4, 5\).*\(3, 5\)"):
        fn(torch.randn(4, 5), torch.randn(3, 5))


def test_dtype_mismatch(fn):
    with pytest.raises(ValueError, match=r"z2.*float64.*z1.*float32"):
        fn(torch.randn(4, 5), torch.randn(4, 5, dtype=F64))


def test_device_mismatch(fn):
    with pytest.raises(ValueError, match=r"z2.*meta"):
        fn(torch.randn(4, 5), torch.randn(4, 5, device="meta"))


def test_empty_batch(fn):
    with pytest.raises(ValueError, match=r"z1.*\(0, 5\)"):
        fn(torch.randn(0, 5), torch.randn(0, 5))


@pytest.mark.parametrize("t", [0.0, -0.2, torch.tensor(0.0)])
def test_bad_temperature(fn, t):
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.randn(4, 5), torch.randn(4, 5), t)


def test_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        co.dcl_loss(torch.randn(4, 5), torch.randn(4, 5), weighted=True, sigma=0.0)


def test_unknown_reduction(fn):
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        fn(torch.randn(4, 5), torch.randn(4, 5), reduction="avg")


def test_unknown_backend(fn):
    with pytest.raises(ValueError, match="backend.*'fast'"):
        fn(torch.randn(4, 5), torch.randn(4, 5), backend="fast")


def test_process_group_not_yet(fn):
    with pytest.raises(NotImplementedError, match="process_group"):
        fn(torch.randn(4, 5), torch.randn(4, 5), process_group=object())


@pytest.mark.parametrize("fused", [False, True])
def test_inputs_not_modified(fn, fused):
    z1 = torch.randn(6, 5, requires_grad=True)
    z2 = torch.randn(6, 5, requires_grad=True)
    c1, c2 = z1.detach().clone(), z2.detach().clone()
    if fused:
        f = dc._fused_dcl if fn is co.dcl_loss else dc._fused_dhel
        loss = f(z1, z2, torch.tensor(0.2), backend="reference")
    else:
        loss = fn(z1, z2, backend="reference")
    loss.backward()
    assert torch.equal(z1.detach(), c1) and torch.equal(z2.detach(), c2)
