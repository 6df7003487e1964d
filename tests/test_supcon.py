"""supcon_loss: reference against a per-anchor loop, the SupContrast formula and
pytorch-metric-learning; the fused composition with the dense core; kernel backends; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import supcon as sc
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64


def _labels(N, kind):
    if kind == "none":
        return None
    if kind == "same":
        return torch.zeros(N, dtype=torch.long)
    g = torch.Generator().manual_seed(N)
    y = torch.randint(0, max(N // 2, 1), (N,), generator=g)
    y[-1] = 1000  # a singleton class
    return y


def loop_supcon(x, labels, tau, base_tau, mode="all", normalize=True):
    """x (N, V, D).  Per anchor (view-major), literally: −(τ/τ_b)·mean_p[s_ap − log Σ_{c≠a} e^{s_ac}]."""
    N, V, _ = x.shape
    u = F.normalize(x.double(), dim=-1) if normalize else x.double()
    z = [u[i, l] for l in range(V) for i in range(N)]
    y = [(i if labels is None else int(labels[i])) for _ in range(V) for i in range(N)]
    A = N if mode == "one" else V * N
    vals, has = [], []
    for a in range(A):
        s = [float(z[a] @ z[c]) / tau for c in range(V * N)]
        P = [p for p in range(V * N) if p != a and y[p] == y[a]]
        if not P:
            vals.append(0.0)
            has.append(False)
            continue
        others = [s[c] for c in range(V * N) if c != a]
        m = max(others)
        log_den = m + math.log(sum(math.exp(t - m) for t in others))
        vals.append(-(tau / base_tau) * sum(s[p] - log_den for p in P) / len(P))
        has.append(True)
    return torch.tensor(vals, dtype=F64), torch.tensor(has)


def supcontrast_formula(x, labels, tau, base_tau, mode):
    """The SupContrast code's computation (max shift, 0/1 self mask) on normalized features."""
    N, V, _ = x.shape
    f = F.normalize(x, dim=-1)
    mask = torch.eye(N, dtype=x.dtype) if labels is None else (labels[:, None] == labels[None, :]).to(x.dtype)
    contrast = torch.cat(torch.unbind(f, 1), 0)
    anchor, count = (f[:, 0], 1) if mode == "one" else (contrast, V)
    logits = anchor @ contrast.T / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = mask.repeat(count, V)
    self_mask = torch.ones_like(mask).scatter(1, torch.arange(N * count).view(-1, 1), 0)
    mask = mask * self_mask
    log_prob = logits - torch.log((torch.exp(logits) * self_mask).sum(1, keepdim=True))
    loss = -(tau / base_tau) * (mask * log_prob).sum(1) / mask.sum(1)
    return loss.view(count, N).mean()


@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("label_kind", ["none", "labels", "same"])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_loop(V, label_kind, mode, normalize):
    N = 7
    x = torch.randn(N, V, 5, dtype=F64) * (1 if normalize else 0.5)
    y = _labels(N, label_kind)
    vals, has = loop_supcon(x, y, 0.2, 0.3, mode, normalize)
    feats = x[:, 0] if V == 1 else x
    kw = dict(base_temperature=0.3, contrast_mode=mode, normalize=normalize, backend="reference")
    torch.testing.assert_close(co.supcon_loss(feats, y, 0.2, reduction="none", **kw), vals)
    torch.testing.assert_close(co.supcon_loss(feats, y, 0.2, reduction="sum", **kw), vals.sum())
    torch.testing.assert_close(co.supcon_loss(feats, y, 0.2, **kw), vals.sum() / max(int(has.sum()), 1))


@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("label_kind", ["none", "labels"])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_reference_matches_supcontrast_formula(V, label_kind, mode):
    x = torch.randn(8, V, 6, dtype=F64, requires_grad=True)
    y = _labels(8, label_kind)
    ours = co.supcon_loss(x, y, 0.1, base_temperature=0.07, contrast_mode=mode, backend="reference")
    theirs = supcontrast_formula(x, y, 0.1, 0.07, mode)
    torch.testing.assert_close(ours, theirs)
    g1, = torch.autograd.grad(ours * 3, x)
    g2, = torch.autograd.grad(theirs * 3, x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("V", [1, 2, 3])
def test_reference_matches_pytorch_metric_learning(V):
    from pytorch_metric_learning.losses import SupConLoss

    N = 9
    x = torch.randn(N, V, 6, dtype=F64, requires_grad=True)
    y = _labels(N, "labels")  # singleton classes leave the mean in both
    ours = co.supcon_loss(x if V > 1 else x[:, 0], y, 0.1, base_temperature=0.1, backend="reference")
    emb = x.transpose(0, 1).reshape(V * N, -1)  # view-major, labels repeated per view
    theirs = SupConLoss(temperature=0.1)(emb, y.repeat(V))
    torch.testing.assert_close(ours, theirs)
    g1, = torch.autograd.grad(ours * 2, x)
    g2, = torch.autograd.grad(theirs * 2, x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("label_kind", ["none", "labels"])
def test_reference_gradcheck(mode, label_kind):
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)
    y = _labels(5, label_kind)
    f = lambda x, t: co.supcon_loss(x, y, t, base_temperature=0.5, contrast_mode=mode,  # noqa: E731
                                    reduction="none", backend="reference")
    assert torch.autograd.gradcheck(f, (x, t))


@pytest.mark.parametrize("fused", [False, True])
def test_no_positive_gives_zero_in_graph(fused):
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)  # one view, labels=None: nobody has a positive
    views = x.unsqueeze(0)
    t = torch.tensor(0.1, dtype=F64)
    if fused:
        loss = sc._fused_supcon(views, None, t, t, backend="reference")
    else:
        loss = sc.supcon_reference(views, None, t, t)
    assert loss.item() == 0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("V", [1, 2, 3, 8])
@pytest.mark.parametrize("N", [1, 2, 13])
@pytest.mark.parametrize("label_kind", ["none", "labels", "same"])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_with_dense_core_equals_reference(V, N, label_kind, mode, reduction):
    x = torch.randn(V, N, 6, dtype=F64)
    y = _labels(N, label_kind)
    outs = []
    for f, kw in ((sc.supcon_reference, {}), (sc._fused_supcon, dict(backend="reference"))):
        xx = x.clone().requires_grad_(True)
        t = torch.tensor(0.3, dtype=F64, requires_grad=True)
        out = f(xx, y, t, torch.tensor(0.2, dtype=F64), contrast_mode=mode, reduction=reduction, **kw)
        w = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(2)) if out.dim() \
            else torch.tensor(1.7, dtype=F64)
        gx, gt = torch.autograd.grad((out * w).sum(), (xx, t), allow_unused=True)
        outs.append((out.detach(), gx, torch.zeros(()) if gt is None else gt))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b.to(a.dtype))


def _sup(x, labels, *, backend, **kw):
    return co.supcon_loss(x, labels, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 2, 3, 8])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_kernel_backends_match_reference(backend, dtype, V, mode):
    N = 37
    x = torch.randn(N, V, 24, device=DEVICE).squeeze(1).requires_grad_(True)
    y = _labels(N, "labels").to(DEVICE)
    for labels in (y, None):
        for reduction in ("mean", "none"):
            compare_with_reference(_sup, [x, labels], backend=backend, dtype=dtype, temperature=0.1,
                                   contrast_mode=mode, reduction=reduction)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_integer_features():
    with pytest.raises(TypeError, match=r"features.*\(4, 2, 5\)"):
        co.supcon_loss(torch.ones(4, 2, 5, dtype=torch.int32))


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"features.*\(4, 2, 5, 1\)"):
        co.supcon_loss(torch.randn(4, 2, 5, 1))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"features.*\(0, 2, 5\)"):
        co.supcon_loss(torch.randn(0, 2, 5))


def test_labels_wrong_shape():
    with pytest.raises(ValueError, match=r"labels.*\(4,\).*\(5,\)"):
        co.supcon_loss(torch.randn(4, 2, 5), torch.zeros(5, dtype=torch.long))


def test_labels_wrong_dtype():
    with pytest.raises(ValueError, match=r"labels.*integer.*float32"):
        co.supcon_loss(torch.randn(4, 2, 5), torch.zeros(4))


def test_labels_wrong_device():
    with pytest.raises(ValueError, match=r"labels.*meta"):
        co.supcon_loss(torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("t", [0.0, -1.0, torch.tensor(-0.5)])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        co.supcon_loss(torch.randn(4, 2, 5), temperature=t)


def test_bad_base_temperature():
    with pytest.raises(ValueError, match="base_temperature"):
        co.supcon_loss(torch.randn(4, 2, 5), base_temperature=0.0)


def test_unknown_contrast_mode():
    with pytest.raises(ValueError, match="contrast_mode.*'two'"):
        co.supcon_loss(torch.randn(4, 2, 5), contrast_mode="two")


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        co.supcon_loss(torch.randn(4, 2, 5), reduction="avg")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend.*'fast'"):
        co.supcon_loss(torch.randn(4, 2, 5), backend="fast")


def test_process_group_not_yet():
    with pytest.raises(NotImplementedError, match="process_group"):
        co.supcon_loss(torch.randn(4, 2, 5), process_group=object())


@pytest.mark.parametrize("fused", [False, True])
def test_inputs_not_modified(fused):
    x = torch.randn(6, 3, 5, requires_grad=True)
    y = torch.tensor([3, 1, 3, 2, 1, 0])
    x0, y0 = x.detach().clone(), y.clone()
    if fused:
        loss = sc._fused_supcon(x.transpose(0, 1), y, torch.tensor(0.1), torch.tensor(0.1), backend="reference")
    else:
        loss = co.supcon_loss(x, y, backend="reference")
    loss.backward()
    assert torch.equal(x.detach(), x0) and torch.equal(y, y0)
