r"""Losses whose positive is in no denominator: DCL / DCLW and DHEL.

With u = ẑ1, v = ẑ2 (normalized when ``normalize=True``), s(a, b) = a·b/τ:

DCL (Yeh et al. 2022; lightly ``DCLLoss`` / ``DCLWLoss``)::

    ℓ⁽¹⁾_i = −w_i·s(u_i, v_i) + LSE( {s(u_i, u_j)}_{j≠i} ∪ {s(u_i, v_j)}_{j≠i} )   (2N−2 negatives)
    ℓ⁽²⁾_i = −w_i·s(u_i, v_i) + LSE( {s(v_i, v_j)}_{j≠i} ∪ {s(v_i, u_j)}_{j≠i} )
    ℓ_i    = ½(ℓ⁽¹⁾_i + ℓ⁽²⁾_i)

with w_i = 1, or for ``weighted=True`` (DCLW) w_i = 2 − N·softmax_i(u_i·v_i/σ)
computed on detached features (the same weights for both directions).

DHEL (Koromilas et al., DHEL-KCL)::

    ℓ_i = −s(u_i, v_i) + LSE_{j≠i} s(u_i, u_j) [+ LSE_{j≠i} s(v_i, v_j) if include_augs]

With N = 1 every LSE set is empty and the term is left out (as in MV-DHEL,
which equals DHEL with ``include_augs=True`` for V = 2).

Fused compositions: Z = cat(u, v) (2N, D) and one core call; DCL excludes
self and the positive per row, DHEL limits each row to its own half.

Under ``process_group`` both views are all-gathered with gradient; the anchors
are this rank's rows, the negatives come from the global batch (excluding the
anchor's own global positions), and DCLW's weights are the softmax over the
global batch (SPEC: over the batch the loss sees).  The references keep this
rank's rows of the dense loss on the gathered batch.
"""
from __future__ import annotations

import torch

from .. import _checks, backends
from .._checks import as_scalar
from .._numerics import masked_lse
from ..distributed import GlobalBatch, all_reduce_lse, uses_ring
from ..primitives.sim_lse import sim_lse
from ._common import inv_temperature, unit

Tensor = torch.Tensor


def _dcl_weights(u: Tensor, v: Tensor, sigma, weighted: bool) -> Tensor:
    """DCLW's negative von Mises-Fisher weights on detached features (1 when not weighted)."""
    if not weighted:
        return torch.ones((), dtype=u.dtype, device=u.device)
    N = u.shape[0]
    sim = (u.detach() * v.detach()).sum(-1) / as_scalar("sigma", sigma, u).detach()
    return 2 - N * torch.softmax(sim, 0)


def dcl_reference(z1: Tensor, z2: Tensor, temperature, *, weighted: bool = False, sigma=0.5,
                  normalize: bool = True, reduction: str = "mean", process_group=None) -> Tensor:
    """Exact dense DCL / DCLW; stores (2N)²."""
    gb = GlobalBatch(z1.shape[0], process_group, z1.device)
    z1, z2 = gb.gather(z1), gb.gather(z2)
    N = z1.shape[0]
    u, v = unit(z1, normalize), unit(z2, normalize)
    scale = inv_temperature(temperature, u)
    w = _dcl_weights(u, v, sigma, weighted)
    Z = torch.cat([u, v])
    S = (Z @ Z.T) * scale
    i = torch.arange(2 * N, device=u.device)
    partner = (i + N) % (2 * N)
    allowed = (i[None, :] != i[:, None]) & (i[None, :] != partner[:, None])
    pos = S[i[:N], partner[:N]]
    values = -w * pos
    if N >= 2:
        lse = masked_lse(S, allowed, 1)
        values = values + 0.5 * (lse[:N] + lse[N:])
    return gb.reduce(gb.local(values), reduction)


def dhel_reference(z1: Tensor, z2: Tensor, temperature, *, include_augs: bool = True, normalize: bool = True,
                   reduction: str = "mean", process_group=None) -> Tensor:
    """Exact dense DHEL; stores N²."""
    gb = GlobalBatch(z1.shape[0], process_group, z1.device)
    z1, z2 = gb.gather(z1), gb.gather(z2)
    N = z1.shape[0]
    u, v = unit(z1, normalize), unit(z2, normalize)
    scale = inv_temperature(temperature, u)
    values = -(u * v).sum(-1) * scale
    if N >= 2:
        not_self = ~torch.eye(N, dtype=torch.bool, device=u.device)
        values = values + masked_lse((u @ u.T) * scale, not_self, 1)
        if include_augs:
            values = values + masked_lse((v @ v.T) * scale, not_self, 1)
    return gb.reduce(gb.local(values), reduction)


def _local_dcl_weights(gb: GlobalBatch, u: Tensor, v: Tensor, sigma, weighted: bool) -> Tensor:
    """This rank's rows of DCLW's weights, the softmax taken over the global batch (detached; 1 when not
    weighted): w_i = 2 − N·exp(sim_i − LSE_global sim), the LSE merged over the ranks (O(n), no gather)."""
    if not weighted or gb.group is None:
        return _dcl_weights(u, v, sigma, weighted)
    sim = (u.detach() * v.detach()).sum(-1) / as_scalar("sigma", sigma, u).detach()
    m = sim.max() if sim.numel() else sim.new_full((), float("-inf"))
    lse = all_reduce_lse(torch.logsumexp(sim, 0) if sim.numel() else m, gb.group)
    return 2 - gb.total * torch.exp(sim - lse)


def _fused_dcl(z1: Tensor, z2: Tensor, temperature, *, weighted: bool = False, sigma=0.5, normalize: bool = True,
               reduction: str = "mean", backend: str, process_group=None, exchange="gather") -> Tensor:
    """DCL / DCLW on the core: this rank's rows of cat(u, v) against all ranks' cat(U, V), excluding
    self and the positive (``n`` local rows, ``N`` global)."""
    n = z1.shape[0]
    gb = GlobalBatch(n, process_group, z1.device, exchange)
    u, v = unit(z1, normalize), unit(z2, normalize)
    N = gb.total
    scale = inv_temperature(temperature, u)
    w = _local_dcl_weights(gb, u, v, sigma, weighted)  # the softmax over the global batch
    values = -w * (u * v).sum(-1) * scale
    if N >= 2:
        a = gb.anchor_index(2, u.device)  # global positions of the local rows of cat(u, v)
        exclude = torch.stack([a, (a + N) % (2 * N)], 1)  # self and the positive
        Zl = torch.cat([u, v]).to(z1.dtype)
        # one process: the same tensor (symmetric Gram)
        Zg = Zl if gb.group is None else gb.candidates(u, v, dtype=z1.dtype)
        lse, _ = sim_lse(Zl, Zg, scale, exclude=exclude, backend=backend)
        values = values + 0.5 * (lse[:n] + lse[n:])
    return gb.reduce(values, reduction)


def _fused_dhel(z1: Tensor, z2: Tensor, temperature, *, include_augs: bool = True, normalize: bool = True,
                reduction: str = "mean", backend: str, process_group=None, exchange="gather") -> Tensor:
    """DHEL on the core: same-view LSE with self excluded, one call (``n`` local rows, ``N`` global)."""
    n = z1.shape[0]
    gb = GlobalBatch(n, process_group, z1.device, exchange)
    u, v = unit(z1, normalize), unit(z2, normalize)
    scale = inv_temperature(temperature, u)
    values = -(u * v).sum(-1) * scale
    N = gb.total
    if N >= 2:
        a = gb.anchor_index(2 if include_augs else 1, u.device)  # global positions of the local rows
        # One process: anchors and candidates are the same tensor, so the kernels take the symmetric Gram.
        if include_augs:
            Zl = torch.cat([u, v]).to(z1.dtype)
            Zc = Zl if gb.group is None else gb.candidates(u, v, dtype=z1.dtype)
            start = torch.arange(2, device=u.device).repeat_interleave(n) * N  # each row's own half
            lse, _ = sim_lse(Zl, Zc, scale, col_start=start, col_end=start + N, exclude=a, backend=backend)
            values = values + lse[:n] + lse[n:]
        else:
            Zl = u.to(z1.dtype)
            lse, _ = sim_lse(Zl, Zl if gb.group is None else gb.candidates(u, dtype=z1.dtype), scale, exclude=a,
                             backend=backend)
            values = values + lse
    return gb.reduce(values, reduction)


def dcl_loss(z1, z2, temperature=0.1, *, weighted=False, sigma=0.5, normalize=True, reduction="mean",
             backend="auto", process_group=None, exchange="gather") -> Tensor:
    r"""Decoupled contrastive loss (lightly ``DCLLoss``; ``weighted=True``: ``DCLWLoss``).

    Args:
        z1, z2: (N, D) features of the two views.
        temperature: τ > 0, float or 0-dim tensor.
        weighted: multiply the positive term by w_i = 2 − N·softmax_i(ẑ1_i·ẑ2_i/σ) (detached).
        sigma: σ > 0 of the weights.
        normalize: L2-normalize first (the weights then use the normalized features).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ((N,), ½(ℓ⁽¹⁾_i + ℓ⁽²⁾_i)).
        exchange: ``"gather"`` or ``"ring"`` under ``process_group`` (see ``info_nce``).

    The positive is in no denominator: each anchor's negatives are the 2N−2
    other features.  Returns fp32 (float64 for float64 inputs).
    """
    _checks.check_pair("z1", z1, "z2", z2, same_rows=True)
    _checks.check_reduction(reduction)
    temperature = _checks.as_scalar("temperature", temperature, z1, positive=True)
    sigma = _checks.as_scalar("sigma", sigma, z1, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="dcl_loss", tensors=[z1, z2])
    kw = dict(weighted=bool(weighted), sigma=sigma, normalize=normalize, reduction=reduction,
              process_group=process_group)
    if name == "reference" and not ring:
        return dcl_reference(z1, z2, temperature, **kw)
    return _fused_dcl(z1, z2, temperature, backend=name, exchange=exchange, **kw)


def dhel_loss(z1, z2, temperature=0.3, *, include_augs=True, normalize=True, reduction="mean",
              backend="auto", process_group=None, exchange="gather") -> Tensor:
    r"""DHEL: ℓ_i = −s(u_i,v_i) + LSE_{j≠i} s(u_i,u_j) [+ LSE_{j≠i} s(v_i,v_j) if ``include_augs``].

    Arguments as :func:`dcl_loss`.  Negatives come from the anchor's own view;
    the positive is in no denominator.
    """
    _checks.check_pair("z1", z1, "z2", z2, same_rows=True)
    _checks.check_reduction(reduction)
    temperature = _checks.as_scalar("temperature", temperature, z1, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="dhel_loss", tensors=[z1, z2])
    kw = dict(include_augs=bool(include_augs), normalize=normalize, reduction=reduction,
              process_group=process_group)
    if name == "reference" and not ring:
        return dhel_reference(z1, z2, temperature, **kw)
    return _fused_dhel(z1, z2, temperature, backend=name, exchange=exchange, **kw)
