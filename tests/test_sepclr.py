"""sepclr_loss: a float64 loop over pairs (values and gradients, τ as a tensor), the official code re-typed,
every backend against the reference (fp32, bf16), the bias terms of the sim_lse core, the module, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.primitives.sim_lse import sim_lse
from helpers import backend_params, compare_with_reference

F64 = torch.float64
ALL = ["reference"] + backend_params()


def _inputs(N=9, Dc=5, Ds=4, dtype=F64, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, d, generator=g, dtype=F64).to(dtype).requires_grad_() for d in (Dc, Dc, Ds, Ds)]
    if labels is None:
        labels = torch.randint(0, 2, (N,), generator=g)
        labels[0], labels[1] = 0, 1
    return xs, labels


# ----------------------------------------------------------------------------- loop from the formulas


def loop_sepclr(c1, c2, s1, s2, labels, tau, wt=1000.0, wr=1000.0, wj=10.0):
    """Literally the module docstring's formulas, one pair at a time."""
    N = c1.shape[0]
    u1, u2 = F.normalize(c1, dim=1), F.normalize(c2, dim=1)
    tgt = [int(v) == 1 for v in labels]
    z1 = [s1[i] if tgt[i] else s1[i] * 0 for i in range(N)]
    z2 = [s2[i] if tgt[i] else s2[i] * 0 for i in range(N)]

    def k(a, b):
        return torch.exp(-((a - b) ** 2).sum() / (2 * tau))

    def align(xs, ys):
        if not xs:
            return c1.new_zeros(())
        return sum(((a - b) ** 2).sum() / (2 * tau) for a, b in zip(xs, ys)) / len(xs)

    def unif(x):
        pairs = [k(x[i], x[j]) for i in range(N) for j in range(i + 1, N)]
        return torch.log(sum(pairs) / len(pairs))

    def jem(c, s):
        return sum(torch.log(sum(k(s[i], s[j]) * k(c[i], c[j]) for j in range(N)) / N) for i in range(N)) / N

    L_c = align(list(u1), list(u2)) + 2 * (unif(list(u2)) + unif(list(u1))) / 2
    L_s = (align([s1[i] for i in range(N) if tgt[i]], [s2[i] for i in range(N) if tgt[i]])
           + 2 * (unif(z2) + unif(z1)) / 2)
    bg = [i for i in range(N) if not tgt[i]]
    reg = (align([s1[i] * 0 for i in bg], [s1[i] for i in bg])
           + align([s2[i] * 0 for i in bg], [s2[i] for i in bg])) / 2
    J = (jem(list(u1), z1) + jem(list(u2), z2)) / 2
    return L_c + wt * L_s + wr * reg + wj * J


# ----------------------------------------------------------------------------- the official code, re-typed
# neurospin-projects/2024_rlouiset_sep_clr, commit 297454539bac2978fe5320596ac862247ac37b7b: ``losses.py``
# (align_loss, uniform_loss, joint_entropy_loss) and the loss block of ``cifar_mnist/sep_clr_k-jem.py``'s
# ``train``, line by line, in float64 on CPU (``.cuda()`` dropped).


def _norm(x):
    return torch.nn.functional.normalize(x, dim=1, p=2)


def _align_loss(x, y, alpha=2, tau=0.5):
    return (x - y).norm(p=2, dim=1).pow(alpha).mul(1 / (2 * tau)).mean()


def _uniform_loss(x, tau=0.5):
    return torch.pdist(x, p=2).pow(2).mul(-1 / (2 * tau)).exp().mean().log()


def _joint_entropy_loss(c, s, tau=0.5):
    s_similarity_matrix = torch.cdist(s, s, p=2.0).pow(2).mul(-1 / (2 * tau)).exp()
    c_similarity_matrix = torch.cdist(c, c, p=2.0).pow(2).mul(-1 / (2 * tau)).exp()
    jem_loss = (s_similarity_matrix * c_similarity_matrix).mean(-1).log().mean()
    return jem_loss


def official_sepclr(common_head_1, common_head_2, specific_head_1, specific_head_2, labels,
                    salient_term_beta=1000, salient_reg_beta=1000, jem_lambda=10):
    specific_head_1_teacher = torch.clone(specific_head_1)
    specific_head_2_teacher = torch.clone(specific_head_2)
    specific_head_1_teacher[labels == 0, :] = 0.0
    specific_head_2_teacher[labels == 0, :] = 0.0
    cm_align_loss = _align_loss(_norm(common_head_1), _norm(common_head_2))
    cm_uniform_loss = (_uniform_loss(_norm(common_head_2)) + _uniform_loss(_norm(common_head_1))) / 2.0
    cm_loss = cm_align_loss + 2.0 * cm_uniform_loss
    sp_align_loss = _align_loss(specific_head_1[labels == 1], specific_head_2[labels == 1])
    sp_uniform_loss = (_uniform_loss(specific_head_2_teacher) + _uniform_loss(specific_head_1_teacher)) / 2.0
    sp_loss = sp_align_loss + 2.0 * sp_uniform_loss
    sp_reg_loss = (_align_loss(specific_head_1_teacher[labels == 0], specific_head_1[labels == 0])
                   + _align_loss(specific_head_2_teacher[labels == 0], specific_head_2[labels == 0])) / 2.0
    jem_loss = _joint_entropy_loss(_norm(common_head_1), specific_head_1_teacher)
    jem_loss = jem_loss + _joint_entropy_loss(_norm(common_head_2), specific_head_2_teacher)
    jem_loss = jem_loss / 2.0
    return cm_loss + salient_term_beta * sp_loss + salient_reg_beta * sp_reg_loss + jem_lambda * jem_loss


# ----------------------------------------------------------------------------- tests


def _grads(out, xs):
    return torch.autograd.grad(out, xs)


@pytest.mark.parametrize("backend", ALL)
def test_matches_loop_values_and_gradients_tau_tensor(backend):
    if backend == "triton":
        pytest.skip("float64: the triton backend is checked in fp32 below")
    xs, y = _inputs(N=7)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    out = co.sepclr_loss(*xs, y, tau=tau, salient_term_beta=2.0, salient_reg_beta=3.0, jem_lambda=0.7,
                         backend=backend)
    assert out.dtype == F64 and out.dim() == 0
    xs2 = [x.detach().clone().requires_grad_() for x in xs]
    tau2 = tau.detach().clone().requires_grad_()
    ref = loop_sepclr(*xs2, y, tau2, 2.0, 3.0, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, xs + [tau]), _grads(ref, xs2 + [tau2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ALL)
def test_matches_official_code(backend):
    dtype = torch.float32 if backend == "triton" else F64
    tol = dict(rtol=2e-5, atol=2e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    xs, y = _inputs(N=16, Dc=8, Ds=6, dtype=dtype, seed=3)
    out = co.sepclr_loss(*xs, y, backend=backend)
    xo = [x.detach().double().clone().requires_grad_() for x in xs]
    ref = official_sepclr(*xo, y)
    assert out.item() > 100  # the weights 1000/1000/10 dominate: a wrong weight shows
    torch.testing.assert_close(out.double(), ref, **tol)
    gtol = dict(rtol=2e-4, atol=2e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for a, b in zip(_grads(out, xs), _grads(ref, xo)):
        torch.testing.assert_close(a.double(), b, **gtol)


@pytest.mark.parametrize("backend", [p for p in backend_params()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backends_match_reference(backend, dtype):
    xs, y = _inputs(N=37, Dc=16, Ds=8, dtype=torch.float32, seed=5)
    with torch.no_grad():
        xs[2].mul_(0.5)
        xs[3].mul_(0.5)

    def fn(a, b, c, d, **kw):
        return co.sepclr_loss(a, b, c, d, y, tau=0.5, salient_term_beta=3.0, salient_reg_beta=2.0, jem_lambda=1.5,
                              **kw)
    compare_with_reference(fn, xs, backend=backend, dtype=dtype, sharpness=2.0, normalized=False)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", ["all_target", "all_background"])
def test_empty_label_sets_give_zero_terms(backend, kind):
    N = 6
    y = torch.ones(N, dtype=torch.long) if kind == "all_target" else torch.zeros(N, dtype=torch.long)
    dtype = torch.float32 if backend == "triton" else F64
    xs, _ = _inputs(N=N, dtype=dtype, labels=y)
    out = co.sepclr_loss(*xs, y, backend=backend)
    ref = loop_sepclr(*[x.double() for x in xs], y, 0.5)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    # the official code's mean over an empty set is NaN there
    assert torch.isnan(official_sepclr(*[x.detach().double() for x in xs], y))
    assert all(torch.isfinite(g).all() for g in _grads(out, xs))


@pytest.mark.parametrize("backend", ALL)
def test_bool_labels_and_module(backend):
    dtype = torch.float32 if backend == "triton" else F64
    xs, y = _inputs(N=8, dtype=dtype, seed=2)
    mod = co.nn.SepCLRLoss(0.4, jem_lambda=2.0, backend=backend)
    assert "jem_lambda=2.0" in repr(mod)
    a = mod(*xs, y.bool())
    b = co.sepclr_loss(*xs, y, tau=0.4, jem_lambda=2.0, backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("want_col", [False, True])
def test_sim_lse_bias_terms(backend, want_col):
    """S = scale·q·kᵀ + r_i + c_j: values and gradients (q, k, r, c, scale) against the dense formula."""
    dtype = torch.float32 if backend == "triton" else F64
    g = torch.Generator().manual_seed(11)
    q = torch.randn(13, 7, generator=g, dtype=F64).to(dtype).requires_grad_()
    k = torch.randn(11, 7, generator=g, dtype=F64).to(dtype).requires_grad_()
    r = torch.randn(13, generator=g, dtype=F64).to(dtype).requires_grad_()
    c = torch.randn(11, generator=g, dtype=F64).to(dtype).requires_grad_()
    sc = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    ex = torch.randint(0, 11, (13,), generator=g)
    row, col = sim_lse(q, k, sc, row_bias=r, col_bias=c, exclude=ex, want_col=want_col, backend=backend)
    S = sc * (q @ k.T) + r[:, None] + c[None]
    S = S.masked_fill(torch.arange(11)[None, :] == ex[:, None], float("-inf"))
    er, ec = S.logsumexp(1), S.logsumexp(0)
    wr, wc = torch.randn(13, generator=g, dtype=F64).to(dtype), torch.randn(11, generator=g, dtype=F64).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(row.to(dtype), er, **tol)
    L = (row.to(dtype) * wr).sum()
    Le = (er * wr).sum()
    if want_col:
        torch.testing.assert_close(col.to(dtype), ec, **tol)
        L, Le = L + (col.to(dtype) * wc).sum(), Le + (ec * wc).sum()
    else:
        assert col is None
    for a, b in zip(torch.autograd.grad(L, [q, k, r, c, sc]), torch.autograd.grad(Le, [q, k, r, c, sc])):
        torch.testing.assert_close(a, b, **tol)


def test_errors_name_arguments_and_shapes():
    xs, y = _inputs(N=5)
    with pytest.raises(ValueError, match="common_1 and common_2 must have the same shape"):
        co.sepclr_loss(xs[0], xs[1][:4], xs[2], xs[3], y)
    with pytest.raises(ValueError, match="same number of rows"):
        co.sepclr_loss(xs[0], xs[1], xs[2][:4], xs[3][:4], y)
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        co.sepclr_loss(*xs, y[:3])
    with pytest.raises(ValueError, match="0 \\(background\\) or 1 \\(target\\)"):
        co.sepclr_loss(*xs, y + 2)
    with pytest.raises(ValueError, match="labels must be an integer or bool"):
        co.sepclr_loss(*xs, y.double())
    with pytest.raises(ValueError, match="tau must be > 0"):
        co.sepclr_loss(*xs, y, tau=0.0)
    with pytest.raises(ValueError, match="jem_lambda must be a finite float >= 0"):
        co.sepclr_loss(*xs, y, jem_lambda=-1.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        co.sepclr_loss(*[x[:1] for x in xs], y[:1])
    with pytest.raises(ValueError, match="dtype"):
        co.sepclr_loss(xs[0], xs[1], xs[2].float(), xs[3], y)


def test_defaults_are_the_cifar_mnist_weights():
    import inspect

    p = inspect.signature(co.sepclr_loss).parameters
    assert (p["tau"].default, p["salient_term_beta"].default, p["salient_reg_beta"].default,
            p["jem_lambda"].default) == (0.5, 1000.0, 1000.0, 10.0)
    assert not math.isnan(co.sepclr_loss(*_inputs(N=4)[0], torch.tensor([0, 1, 0, 1]), backend="reference").item())


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "cpu"])
def test_compiles_fullgraph(backend):
    xs, y = _inputs(N=16, Dc=8, Ds=8, dtype=torch.float32, seed=6)
    fn = torch.compile(lambda a, b, c, d, y: co.sepclr_loss(a, b, c, d, y, backend=backend), fullgraph=True)
    out = fn(*xs, y)
    ref = co.sepclr_loss(*xs, y, backend=backend)
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads(out, xs), _grads(ref, xs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "cpu"])
def test_fused_path_stores_no_n_by_n_buffer(backend):
    """Peak tensor bytes of a forward + backward stay O(N·D): far below one N×N fp32 matrix."""
    from contrastive_ops.benchmarking.measure import peak_memory

    N = 2048
    xs, y = _inputs(N=N, Dc=8, Ds=8, dtype=torch.float32, seed=7)

    def step(be):
        return lambda: torch.autograd.grad(co.sepclr_loss(*xs, y, backend=be), xs)

    fused = peak_memory(step(backend), torch.device("cpu"))
    dense = peak_memory(step("reference"), torch.device("cpu"))
    assert dense >= N * N * 4  # the measure sees the reference's N×N blocks
    assert fused < N * N * 4 / 4, f"fused peak {fused} bytes vs one N×N fp32 matrix {N * N * 4}"
