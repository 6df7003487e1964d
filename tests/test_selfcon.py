"""selfcon_loss: a float64 per-anchor loop (values and gradients) and the official ConLoss code, on the
reference and on every kernel backend; the module; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64


def _labels(N, kind):
    if kind == "none":
        return None
    if kind == "same":
        return torch.zeros(N, dtype=torch.long)
    g = torch.Generator().manual_seed(N)
    y = torch.randint(0, max(N // 2, 1), (N,), generator=g)
    y[-1] = 1000  # a singleton class: no positive on the backbone view alone
    return y


def _lse(xs):
    m = max(float(v.detach()) for v in xs)
    return m + torch.log(sum(torch.exp(v - m) for v in xs))


def loop_selfcon(x, labels, tau, base_tau, alpha=0.0, normalize=True):
    """x (N, V, D), backbone last.  Per anchor, literally from the formulas; returns (values (V·N,), mean).

    ℓ_a(C) = −(τ/τ_b)·(1/|P(a)|)·Σ_{p∈P(a)} [s_ap − log Σ_{c∈C, c≠a} e^{s_ac}], P(a) = {c ∈ C, c ≠ a, y_c = y_a}.
    """
    N, V, _ = x.shape
    u = F.normalize(x, dim=-1) if normalize else x
    z = [u[i, l] for l in range(V) for i in range(N)]
    y = [(i if labels is None else int(labels[i])) for _ in range(V) for i in range(N)]
    every = list(range(V * N))
    backbone = list(range((V - 1) * N, V * N))

    def ell(a, C):
        P = [p for p in C if p != a and y[p] == y[a]]
        if not P:
            return None
        log_den = _lse([z[a] @ z[c] / tau for c in C if c != a])
        return -(tau / base_tau) * sum(z[a] @ z[p] / tau - log_den for p in P) / len(P)

    zero = x.new_zeros(())
    if alpha == 0:
        terms = [ell(a, every) for a in every]
        vals = [zero if t is None else t for t in terms]
        kept = [t for t in terms if t is not None]
        mean = sum(kept) / len(kept) if kept else zero
        return torch.stack(vals), mean
    sub = [ell(a, every) for a in range(0, (V - 1) * N)]
    bb = [ell(a, backbone) if labels is not None else None for a in backbone]
    vals = [zero if t is None else alpha * t for t in sub] + [zero if t is None else t for t in bb]
    kept_sub = [t for t in sub if t is not None]
    kept_bb = [t for t in bb if t is not None]
    mean = (sum(kept_bb) / len(kept_bb) if kept_bb else zero) + alpha * (sum(kept_sub) / len(kept_sub))
    return torch.stack(vals), mean


def official_conloss(features, labels, tau, base_tau, *, selfcon_s_FG=False, supcon_s=False):
    """raymin0223/Self-Contrastive-Learning ``losses/losses.py`` ConLoss.forward (contrast_mode 'all', no memory)."""
    batch_size = features.shape[0]
    if labels is None:
        mask = torch.eye(batch_size, dtype=features.dtype)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    if not selfcon_s_FG:
        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_feature, anchor_count = contrast_feature, contrast_count
    else:
        contrast_count = features.shape[1]
        anchor_count = features.shape[1] - 1
        anchor_feature = torch.cat(torch.unbind(features, dim=1)[:-1], dim=0)
        contrast_feature = torch.cat([anchor_feature, torch.unbind(features, dim=1)[-1]], dim=0)
    logits = anchor_feature @ contrast_feature.T / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    if supcon_s:
        idx = mask.sum(1) != 0
        mask, logits_mask, logits = mask[idx, :], logits_mask[idx, :], logits[idx, :]
        batch_size = int(idx.sum())
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(tau / base_tau) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def official_selfcon(x, labels, tau, alpha):
    """``main_represent.py`` ``_train`` for SelfCon, single view: what it adds up for a batch."""
    f = F.normalize(x, dim=-1)  # the network normalizes every exit
    if not alpha:
        return official_conloss(f, labels, tau, 0.07)
    loss = x.new_zeros(())
    if labels is not None:
        loss = loss + official_conloss(f[:, -1:], labels, tau, 0.07, supcon_s=True)
    return loss + alpha * official_conloss(f, labels, tau, 0.07, selfcon_s_FG=True)


@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("label_kind", ["none", "labels", "same"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_loop(V, label_kind, alpha, normalize):
    N = 6
    x = (torch.randn(N, V, 5, dtype=F64) * (1 if normalize else 0.5)).requires_grad_(True)
    y = _labels(N, label_kind)
    vals, mean = loop_selfcon(x, y, 0.2, 0.3, alpha, normalize)
    kw = dict(base_temperature=0.3, alpha=alpha, normalize=normalize, backend="reference")
    torch.testing.assert_close(co.selfcon_loss(x, y, 0.2, reduction="none", **kw), vals.detach())
    torch.testing.assert_close(co.selfcon_loss(x, y, 0.2, reduction="sum", **kw), vals.sum().detach())
    out = co.selfcon_loss(x, y, 0.2, **kw)
    torch.testing.assert_close(out, mean.detach())
    g_ref, = torch.autograd.grad(out, x)
    g_loop, = torch.autograd.grad(mean, x)
    torch.testing.assert_close(g_ref, g_loop)


@pytest.mark.parametrize("label_kind", ["none", "labels"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_reference_matches_official_code(label_kind, alpha):
    N, V = 8, 3
    x = torch.randn(N, V, 6, dtype=F64)
    y = _labels(N, label_kind)
    if label_kind == "labels":
        y[-1] = 0  # the official code gives NaN for an anchor with no positive unless supcon_s
    out = co.selfcon_loss(x, y, 0.1, alpha=alpha, backend="reference")
    torch.testing.assert_close(out, official_selfcon(x, y, 0.1, alpha))


def test_alpha_zero_is_supcon_over_exits():
    x = torch.randn(5, 3, 4, dtype=F64)
    y = torch.tensor([0, 1, 0, 2, 1])
    torch.testing.assert_close(co.selfcon_loss(x, y, 0.1, backend="reference"),
                               co.supcon_loss(x, y, 0.1, backend="reference"))


def test_sequence_of_exits_equals_stack():
    exits = [torch.randn(5, 4, dtype=F64) for _ in range(3)]
    y = torch.tensor([0, 1, 0, 2, 1])
    torch.testing.assert_close(co.selfcon_loss(exits, y, alpha=0.3, backend="reference"),
                               co.selfcon_loss(torch.stack(exits, 1), y, alpha=0.3, backend="reference"))


def _selfcon(x, labels, *, backend, **kw):
    return co.selfcon_loss(x, labels, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("label_kind", ["none", "labels"])
def test_kernel_backends_match_loop(backend, alpha, label_kind):
    N, V = 7, 3
    x64 = torch.randn(N, V, 6, dtype=F64)
    y = _labels(N, label_kind)
    vals, mean = loop_selfcon(x64.clone().requires_grad_(True), y, 0.1, 0.07, alpha)
    x = x64.float().to(DEVICE).requires_grad_(True)
    yd = None if y is None else y.to(DEVICE)
    out = co.selfcon_loss(x, yd, 0.1, alpha=alpha, reduction="none", backend=backend)
    torch.testing.assert_close(out.double().cpu(), vals.detach(), rtol=1e-5, atol=1e-5)
    out = co.selfcon_loss(x, yd, 0.1, alpha=alpha, backend=backend)
    torch.testing.assert_close(out.double().cpu(), mean.detach(), rtol=1e-5, atol=1e-5)
    (2 * out).backward()
    x_loop = x64.clone().requires_grad_(True)
    (2 * loop_selfcon(x_loop, y, 0.1, 0.07, alpha)[1]).backward()
    torch.testing.assert_close(x.grad.double().cpu(), x_loop.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_kernel_backends_match_reference(backend, dtype, alpha):
    N = 19
    x = torch.randn(N, 3, 16, device=DEVICE).requires_grad_(True)
    t = torch.tensor(0.2, requires_grad=True)
    y = _labels(N, "labels").to(DEVICE)
    for labels in (y, None):
        for reduction in ("mean", "none"):
            compare_with_reference(_selfcon, [x, labels], backend=backend, dtype=dtype, temperature=0.1,
                                   alpha=alpha, reduction=reduction, sharpness=10.0, normalized=True)
    # a temperature tensor receives its gradient through the kernel's dscale
    out = co.selfcon_loss(x.detach(), y, t, alpha=alpha, backend=backend)
    g, = torch.autograd.grad(out, t)
    tr = t.detach().clone().requires_grad_(True)
    gr, = torch.autograd.grad(co.selfcon_loss(x.detach(), y, tr, alpha=alpha, backend="reference"), tr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)


def test_module():
    x = torch.randn(6, 3, 5)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    m = co.nn.SelfConLoss(0.1, alpha=0.5, backend="reference")
    torch.testing.assert_close(m(x, y), co.selfcon_loss(x, y, 0.1, alpha=0.5, backend="reference"))
    assert "alpha=0.5" in repr(m)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_one_view_rejected():
    with pytest.raises(ValueError, match=r"features.*\(4, 1, 3\)"):
        co.selfcon_loss(torch.randn(4, 1, 3))


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"features.*\(4, 3\)"):
        co.selfcon_loss(torch.randn(4, 3))


def test_labels_wrong_shape():
    with pytest.raises(ValueError, match=r"labels.*\(4,\).*\(5,\)"):
        co.selfcon_loss(torch.randn(4, 2, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha.*\(4, 3\)"):
        co.selfcon_loss(torch.randn(4, 2, 3), alpha=alpha)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        co.selfcon_loss(torch.randn(4, 2, 3), temperature=t)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inputs_not_modified(backend):
    if not co.available_backends()[backend][0]:
        pytest.skip(co.available_backends()[backend][1])
    x = torch.randn(5, 3, 4, requires_grad=True)
    x0 = x.detach().clone()
    out = co.selfcon_loss(x, torch.tensor([0, 1, 0, 1, 2]), alpha=0.5, backend=backend)
    out.backward()
    assert torch.equal(x.detach(), x0)
    assert math.isfinite(float(out))
