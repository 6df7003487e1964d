"""cacr_loss and its primitive sim_expect: float64 loops from the formulas (values and gradients, τ⁺/τ⁻ as
tensors), the official code re-typed, the Triton kernels against the reference (fp32, bf16), backends without
the primitive, the module, bad input."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops import backends
from contrastive_ops.primitives.sim_expect import sim_expect
from helpers import backend_params, compare_with_reference

F64 = torch.float64


def _has_sim_expect(name):
    return backends.has_primitive(name, "sim_expect")


FUSED = [p for p in backend_params() if p.values[0] in ("cpu", "triton")]
ALL = ["reference"] + FUSED


def _views(N=7, V=3, D=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, D, generator=g, dtype=F64).to(dtype).requires_grad_()


# ----------------------------------------------------------------------------- loop from the formulas


def loop_cacr(x, alpha, beta, tau_pos, tau_neg, choice="full", with_debiased=False, tau_plus=0.1, normalize=True):
    """x (N, V, D); per instance, one pair at a time; returns (values (N,), mean)."""
    N, V, _ = x.shape
    z = F.normalize(x, dim=-1) if normalize else x

    def d(a, b):
        return ((a - b) ** 2).sum()

    def softmax_weighted(logits, costs):
        m = max(float(v.detach()) for v in logits)
        e = [torch.exp(v - m) for v in logits]
        tot = sum(e)
        return sum(ei / tot * c for ei, c in zip(e, costs))

    vals = []
    for i in range(N):
        att = []
        for xv in range(V):
            ds = [d(z[i, xv], z[i, y]) for y in range(V) if y != xv]
            if choice in ("none", "without_w1"):
                att.append(sum(alpha * v for v in ds) / len(ds))
            else:
                att.append(softmax_weighted([tau_pos * v for v in ds], [alpha * v for v in ds]))
        rep = []
        for xv in range(V):
            for y in range(xv + 1, V):
                ds = [d(z[i, xv], z[j, y]) for j in range(N) if j != i]
                if choice in ("none", "without_w2"):
                    r = sum(-beta * v for v in ds) / len(ds)
                else:
                    r = softmax_weighted([-tau_neg * v for v in ds], [-beta * v for v in ds])
                    if with_debiased:
                        r = (-tau_plus * d(z[i, xv], z[i, y]) + r) / (1 - tau_plus)
                rep.append(r)
        vals.append(sum(att) / V + sum(rep) / len(rep))
    vals = torch.stack(vals)
    return vals, vals.mean()


# ----------------------------------------------------------------------------- the official code, re-typed
# JegZheng/CACR-SSL, commit 4dd3ef3a49a459baa0e0031d7d1899d9cfd9ee16, small_scale_experiments/losses/__init__.py
# (our_loss1, forward_negative_loss with the Euclidean cost, our_loss2), line by line in float64 on CPU
# (``.cuda()`` dropped from the diagonal mask).


def our_loss1(latent_codes_list, alpha=1.0, tau_pos=1.0, choice='full'):
    loss1 = 0.0
    for x in range(len(latent_codes_list)):
        z_x = latent_codes_list[x]
        mask = list(range(len(latent_codes_list)))
        mask.pop(x)
        masked_z_x = torch.stack(latent_codes_list, dim=0)[mask]
        cost = (z_x - masked_z_x).norm(p=2, dim=-1).pow(2).transpose(1, 0).mul(alpha)
        dist = cost.mul(tau_pos / alpha)
        weights = torch.softmax(dist, dim=1)
        if choice in ['none', 'without_w1']:
            loss1 += (cost).mean()
        else:
            loss1 += (cost * weights).sum(1).mean()
    return loss1 / (len(latent_codes_list)), weights


def forward_negative_loss(z_x, z_y, beta=1.0, tau_neg=1.0, tau_plus=0.1, choice='full', with_debiased=False):
    cost = torch.norm(z_x[:, None] - z_y, dim=-1).pow(2).mul(-beta)
    cost = cost.masked_select(~torch.from_numpy(np.eye(cost.shape[0], dtype=bool))).view(cost.shape[0],
                                                                                         cost.shape[0] - 1)
    dist = cost.mul(tau_neg / beta)
    weights = torch.softmax(dist, dim=1)
    if choice in ['none', 'without_w2']:
        loss = (cost).mean()
    else:
        if with_debiased:
            pos = (z_x - z_y).norm(p=2, dim=-1).pow(2)
            reweight_neg = (cost * weights).sum(1)
            loss = ((-tau_plus * pos + reweight_neg) / (1 - tau_plus)).mean()
        else:
            loss = (cost * weights).sum(1).mean()
    return loss, weights


def our_loss2(latent_codes_list, beta=1.0, tau_neg=1.0, tau_plus=0.1, choice='full', with_debiased=False):
    loss2 = 0.0
    counter = 0
    for x in range(len(latent_codes_list)):
        z_x = latent_codes_list[x]
        for y in range(x + 1, len(latent_codes_list)):
            z_y = latent_codes_list[y]
            loss_for, weights = forward_negative_loss(z_x, z_y, beta=beta, tau_neg=tau_neg, tau_plus=tau_plus,
                                                      choice=choice, with_debiased=with_debiased)
            loss2 += loss_for
            counter += 1
    return loss2 / counter, weights


# ----------------------------------------------------------------------------- the primitive


@pytest.mark.parametrize("with_exclude", [False, True])
def test_sim_expect_reference_matches_loop(with_exclude):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    s = torch.tensor(1.3, dtype=F64, requires_grad=True)
    ex = torch.tensor([0, 4, -1, 2, 1, 3]) if with_exclude else None
    lse, mean = sim_expect(q, k, s, exclude=ex, backend="reference")
    for i in range(6):
        js = [j for j in range(5) if ex is None or j != int(ex[i])]
        G = torch.stack([q[i] @ k[j] for j in js])
        torch.testing.assert_close(lse[i], torch.logsumexp(s * G, 0))
        torch.testing.assert_close(mean[i], (torch.softmax(s * G, 0) * G).sum())
    # the backward formula of the module docstring, against autograd of the dense version
    gl, gm = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    dq, dk, ds = torch.autograd.grad((lse * gl + mean * gm).sum(), [q, k, s])
    G = q.detach() @ k.detach().T
    allowed = torch.ones(6, 5, dtype=torch.bool) if ex is None else torch.arange(5)[None] != ex[:, None]
    P = torch.softmax((s.detach() * G).masked_fill(~allowed, float("-inf")), 1)
    m = mean.detach()
    dG = P * (s.detach() * gl[:, None] + gm[:, None] * (1 + s.detach() * (G - m[:, None])))
    torch.testing.assert_close(dq, dG @ k.detach())
    torch.testing.assert_close(dk, dG.T @ q.detach())
    var = (P * G * (G - m[:, None])).sum(1)
    torch.testing.assert_close(ds, (gl * m + gm * var).sum())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 29, 20), (5, 40, 3), (1, 1, 8)])
@pytest.mark.parametrize("scale", [0.0, 0.6, 8.0])
def test_sim_expect_kernel_matches_reference(backend, dtype, shape, scale):
    B, M, D = shape
    g = torch.Generator().manual_seed(B + M)
    # rows of norm ~1 (as CACR's unit features): logits of size ``scale``
    q = F.normalize(torch.randn(B, D, generator=g), dim=1).mul(1.2).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(M, D, generator=g), dim=1).to(dtype).requires_grad_()
    ex = torch.randint(-1, M, (B,), generator=g)
    ex[0] = 0  # (1, 1, 8): the only candidate excluded, lse = −inf, mean = 0, no gradient
    fn = lambda q, k, s, **kw: torch.stack(sim_expect(q, k, s, exclude=ex, **kw)).nan_to_num(neginf=-1e4)  # noqa: E731
    s = torch.tensor(scale, requires_grad=True)
    compare_with_reference(fn, [q, k, s], backend=backend, dtype=dtype, sharpness=max(scale, 1.0))


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "cpu"])
def test_sim_expect_cpu_float64_gradcheck(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    s = torch.tensor(0.9, dtype=F64, requires_grad=True)
    ex = torch.tensor([0, -1, 3, 1, 2])
    torch.autograd.gradcheck(lambda q, k, s: sim_expect(q, k, s, exclude=ex, backend=backend), (q, k, s))


def test_sim_expect_poisoned_outputs_are_all_written():
    pytest.importorskip("triton")
    if not any(p.values[0] == "triton" and not p.marks for p in FUSED):
        pytest.skip("triton backend not usable here")
    from contrastive_ops.backends._triton import tiles

    q = torch.randn(21, 9, requires_grad=True)
    k = torch.randn(18, 9, requires_grad=True)
    old = tiles.POISON_OUTPUTS
    tiles.POISON_OUTPUTS = True
    try:
        lse, mean = sim_expect(q, k, 0.7, backend="triton")
        (lse.sum() + mean.sum()).backward()
    finally:
        tiles.POISON_OUTPUTS = old
    assert torch.isfinite(lse).all() and torch.isfinite(mean).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(alpha=0.5, beta=2.0, choice="without_w1"),
                                dict(choice="without_w2"), dict(choice="none"),
                                dict(with_debiased=True, tau_plus=0.2)])
def test_reference_matches_loop_with_tensor_temperatures(normalize, kw):
    x = _views()
    tp = torch.tensor(0.7, dtype=F64, requires_grad=True)
    tn = torch.tensor(1.6, dtype=F64, requires_grad=True)
    out = co.cacr_loss(x, tau_pos=tp, tau_neg=tn, normalize=normalize, reduction="none", backend="reference", **kw)
    x2 = x.detach().clone().requires_grad_()
    tp2, tn2 = tp.detach().clone().requires_grad_(), tn.detach().clone().requires_grad_()
    vals, _ = loop_cacr(x2, kw.get("alpha", 1.0), kw.get("beta", 1.0), tp2, tn2, kw.get("choice", "full"),
                        kw.get("with_debiased", False), kw.get("tau_plus", 0.1), normalize)
    torch.testing.assert_close(out, vals, rtol=1e-10, atol=1e-12)
    w = torch.randn(vals.shape, dtype=F64)
    got = torch.autograd.grad((out * w).sum(), [x, tp, tn], allow_unused=True)
    exp = torch.autograd.grad((vals * w).sum(), [x2, tp2, tn2], allow_unused=True)
    for a, b in zip(got, exp):
        if b is None:
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(alpha=0.5, beta=2.0, tau_pos=0.7, tau_neg=3.0), dict(choice="none"),
                                dict(choice="without_w2", with_debiased=True), dict(with_debiased=True, tau_plus=0.2)])
def test_matches_official_code(backend, normalize, kw):
    dtype = F64 if backend == "reference" else torch.float32
    x = _views(N=19, V=5, D=12, dtype=dtype, seed=4)
    out = co.cacr_loss(x.unbind(1), normalize=normalize, backend=backend, **kw)
    xo = x.detach().double().clone().requires_grad_()
    zs = [F.normalize(t, dim=1) if normalize else t for t in xo.unbind(1)]
    a = {k: kw[k] for k in ("alpha", "tau_pos", "choice") if k in kw}
    b = {k: kw[k] for k in ("beta", "tau_neg", "tau_plus", "choice", "with_debiased") if k in kw}
    ref = our_loss1(zs, **a)[0] + our_loss2(zs, **b)[0]
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    gtol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0].double(), torch.autograd.grad(ref, xo)[0], **gtol)


def test_weights_are_not_detached():
    """Detaching π⁻ changes the gradient: the loss keeps the weights in the graph (as the code)."""
    x = _views(N=6, V=2, D=4)
    g = torch.autograd.grad(co.cacr_loss(x, backend="reference"), x)[0]
    xo = x.detach().clone().requires_grad_()
    z = F.normalize(xo, dim=-1)
    d = ((z[:, 0, None] - z[None, :, 1]) ** 2).sum(-1)
    eye = torch.eye(6, dtype=torch.bool)
    w = torch.softmax((-d).masked_fill(eye, float("-inf")), 1).detach()
    rep = (w * torch.where(eye, 0, -d)).sum(1)
    dp = ((z[:, 0] - z[:, 1]) ** 2).sum(-1)
    att = dp  # two views: one positive, weight 1
    gd = torch.autograd.grad((att + rep).mean(), xo)[0]
    assert (g - gd).abs().max() > 1e-3


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_matches_reference(backend, dtype, normalize, reduction):
    x = _views(N=23, V=3, D=16, dtype=torch.float32, seed=7)
    if not normalize:
        with torch.no_grad():
            x.mul_(0.4)
    tn = torch.tensor(2.0, requires_grad=True)
    fn = lambda x, tn, **kw: co.cacr_loss(x, tau_pos=0.5, tau_neg=tn, normalize=normalize,  # noqa: E731
                                          reduction=reduction, **kw)
    compare_with_reference(fn, [x, tn], backend=backend, dtype=dtype, sharpness=4.0, normalized=normalize)


def test_cuda_backend_has_no_sim_expect():
    """The CUDA kernels do not implement the primitive: asking for them raises (never a fallback)."""
    from contrastive_ops.backends import _cext

    assert "sim_expect" not in _cext.PRIMITIVES  # the table the "cuda" backend exposes
    if co.available_backends()["cuda"][0] and torch.cuda.is_available():
        x = _views(N=4, V=2, D=3, dtype=torch.float32).detach().cuda()
        with pytest.raises(RuntimeError, match=r"does not implement \['sim_expect'\]"):
            co.cacr_loss(x, backend="cuda")
    else:
        x = _views(N=4, V=2, D=3, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="cannot run cacr_loss"):
            co.cacr_loss(x, backend="cuda")


def test_auto_on_cpu_tensors_takes_the_cpu_kernels():
    if not (co.available_backends()["cpu"][0] and _has_sim_expect("cpu")):
        pytest.skip("the cpu backend is not usable here")
    x = _views(N=4, V=2, D=3, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the plain-PyTorch reference" warning
        out = co.cacr_loss(x, backend="auto")
    torch.testing.assert_close(out, co.cacr_loss(x, backend="reference"))


@pytest.mark.parametrize("backend", ALL)
def test_reductions_and_module(backend):
    dtype = F64 if backend == "reference" else torch.float32
    x = _views(N=9, V=4, D=6, dtype=dtype, seed=2)
    none = co.cacr_loss(x, backend=backend, reduction="none")
    assert none.shape == (9,) and none.dtype == dtype
    torch.testing.assert_close(co.cacr_loss(x, backend=backend), none.mean())
    torch.testing.assert_close(co.cacr_loss(x, backend=backend, reduction="sum"), none.sum())
    mod = co.nn.CACRLoss(0.5, 2.0, tau_neg=0.3, backend=backend)
    assert "tau_neg=0.3" in repr(mod)
    expected = co.cacr_loss(x, alpha=0.5, beta=2.0, tau_neg=0.3, backend=backend)
    torch.testing.assert_close(mod(list(x.unbind(1))), expected)


def test_errors_name_arguments_and_shapes():
    x = _views(N=4, V=2, D=3)
    with pytest.raises(ValueError, match="choice must be one of"):
        co.cacr_loss(x, choice="half")
    with pytest.raises(ValueError, match="tau_plus must be < 1"):
        co.cacr_loss(x, with_debiased=True, tau_plus=1.0)
    with pytest.raises(ValueError, match="tau_neg must be >= 0"):
        co.cacr_loss(x, tau_neg=-0.1, backend="reference")
    with pytest.raises(ValueError, match="alpha must be a finite float"):
        co.cacr_loss(x, alpha=float("nan"))
    with pytest.raises(ValueError, match="at least 2 instances"):
        co.cacr_loss(x[:1], backend="reference")
    with pytest.raises(ValueError, match="features"):
        co.cacr_loss(x[:, :1], backend="reference")
    with pytest.raises(ValueError, match="reduction"):
        co.cacr_loss(x, reduction="avg")


CPU = [p for p in backend_params() if p.values[0] == "cpu"]


@pytest.mark.parametrize("backend", CPU)
def test_compiles_fullgraph(backend):
    x = _views(N=12, V=3, D=8, dtype=torch.float32, seed=8)
    fn = torch.compile(lambda x: co.cacr_loss(x, tau_neg=0.5, backend=backend), fullgraph=True)
    out = fn(x)
    ref = co.cacr_loss(x, tau_neg=0.5, backend=backend)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref, x)[0])


@pytest.mark.parametrize("backend", CPU)
def test_fused_path_stores_no_n_by_n_buffer(backend):
    """Peak tensor bytes of a forward + backward stay far below one N×N fp32 matrix (the reference's)."""
    from contrastive_ops.benchmarking.measure import peak_memory

    N = 4096  # the kernel's tiles are O(64·N) per thread: 4096 leaves a clear gap to N×N
    x = _views(N=N, V=2, D=8, dtype=torch.float32, seed=9)

    def step(be):
        return lambda: torch.autograd.grad(co.cacr_loss(x, backend=be), x)

    assert peak_memory(step("reference"), torch.device("cpu")) >= N * N * 4
    fused = peak_memory(step(backend), torch.device("cpu"))
    assert fused < N * N * 4 / 4, f"fused peak {fused} bytes vs one N×N fp32 matrix {N * N * 4}"
