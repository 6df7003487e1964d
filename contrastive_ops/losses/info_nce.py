r"""InfoNCE family: ``info_nce``, ``clip_loss``, ``nt_xent``, ``similarity_lse``.

Maths
-----
With ``s(a, b) = â·b̂ / τ`` (``normalize=True``, ``û = u/max(‖u‖, 1e-12)``) or
``a·b / τ``, and ``S = scale · Q Kᵀ`` (``scale = 1/τ``)::

    info_nce     ℓ_i = −S[i, t_i] + LSE_j S[i, j]                     (B,)   t = targets or arange(B)
      symmetric  ℓ_i = ½(ℓ_i^row + ℓ_i^col),
                 ℓ_i^col = −S[i, i] + LSE_j S[j, i]                     (needs M == B)
    clip_loss    ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)]  = info_nce(I, T, symmetric, scale = s,
                 no normalization, mean)
    nt_xent      Z = cat(ẑ1, ẑ2) (2N, D);  ℓ_a = −S[a, a±N] + LSE_{b≠a} S[a, b]      (2N,)
                 view-1 anchors first; the positive stays in the denominator
    similarity_lse  LSE_j (scale · q_i·k_j)                             (B,)

Gradients (what the core's backward gives the LSE terms, PyTorch gives the
positive terms): ∂ℓ_i/∂S[i, j] = P[i, j] − [j = t_i], P = softmax_j S[i, ·].

Layout of each loss
-------------------
``<loss>_reference``  the exact dense formula in plain PyTorch (fp32, float64 for
                      float64 inputs), written from the maths above and
                      independent of the core; this is ``backend="reference"``.
``_fused_<loss>``     the composition on ``core.sim_lse``: normalization and
                      positive logits in PyTorch on O((B+M)·D) tensors, every
                      LSE from the core.  With ``backend="reference"`` the core
                      is its dense version, which is how tests check the
                      composition without a kernel.
``<loss>``            the public function: argument checks once, then
                      ``backends.resolve`` picks one of the two above.

Under ``process_group`` the keys (and for the symmetric / NT-Xent forms, the
other side) are to be all-gathered with gradient before the core call; the
fused compositions take their key tensors from ``_keys`` so that is the one
place to add it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends, core
from .._checks import (
    _compiling,
    as_scalar,
    check_features,
    check_reduction,
    check_same_device_dtype,
    check_same_dim,
    check_same_shape,
    reduce,
    shape_str,
)
from ..core import acc_dtype

Tensor = torch.Tensor

NORM_EPS = 1e-12


# --------------------------------------------------------------------------- helpers


def _check_no_process_group(process_group) -> None:
    if process_group is not None:
        raise NotImplementedError("process_group support lands with the distributed module")


def _check_targets(targets, B: int, M: int, device) -> Tensor:
    """targets: integer tensor of shape (B,) on the features' device with values in [0, M)."""
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be an int64 tensor of shape ({B},), got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be an integer (int64) tensor, got dtype {targets.dtype} with shape {shape_str(targets)}"
        )
    if tuple(targets.shape) != (B,):
        raise ValueError(f"targets must have shape ({B},) (one per query row), got {shape_str(targets)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but query is on {device}")
    if not _compiling():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= M:
            raise ValueError(
                f"targets must lie in [0, {M}) for key of {M} rows, got values in [{lo}, {hi}] "
                f"(targets shape {shape_str(targets)})"
            )
    return targets.long()


def _check_pair(a_name: str, a, b_name: str, b, *, same_rows: bool) -> None:
    check_features(a_name, a)
    check_features(b_name, b)
    check_same_device_dtype([(a_name, a), (b_name, b)])
    if same_rows:
        check_same_shape(a_name, a, b_name, b)
    else:
        check_same_dim(a_name, a, b_name, b)


def _normalized_acc(x: Tensor, normalize: bool) -> Tensor:
    """Reference path: ``x`` in the accumulation dtype, L2-normalized there if asked."""
    x = x.to(acc_dtype(x.dtype))
    return F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x


def _normalized_like(x: Tensor, normalize: bool):
    """Fused path: normalize in the accumulation dtype; return ``(for the kernel, for PyTorch-side terms)``.

    See ``core.kernel_operands``: the kernel reads the input dtype, the
    positive logits use the same rounded values in fp32, and both gradients
    are summed in fp32 before the final cast.
    """
    return core.kernel_operands(_normalized_acc(x, normalize), x.dtype)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a_id·b_id in the accumulation dtype (the positive logits, O(B·D))."""
    dt = acc_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(1)


def _inv_tau(temperature, like: Tensor) -> Tensor:
    """1/τ as a 0-dim tensor in the accumulation dtype (checked > 0 by the public function)."""
    return 1.0 / as_scalar("temperature", temperature, like)


def _keys(key: Tensor) -> Tensor:
    """The candidate rows the core sees: the local keys (the distributed module gathers here)."""
    return key


# --------------------------------------------------------------------------- info_nce


def info_nce_reference(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
                       reduction="mean") -> Tensor:
    """Dense InfoNCE: ℓ_i = −S[i, t_i] + LSE_j S[i, j] (stores B×M)."""
    q = _normalized_acc(query, normalize)
    k = _normalized_acc(key, normalize)
    S = (q @ k.T) * _inv_tau(temperature, q)
    B = S.shape[0]
    if symmetric:
        pos = S.diagonal()
        loss = 0.5 * ((S.logsumexp(1) - pos) + (S.logsumexp(0) - pos))
    else:
        t = torch.arange(B, device=S.device) if targets is None else targets.long()
        pos = S.gather(1, t[:, None]).squeeze(1)
        loss = S.logsumexp(1) - pos
    return reduce(loss, reduction)


def _fused_info_nce(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
                    reduction="mean", backend: str) -> Tensor:
    """InfoNCE on ``core.sim_lse``: row (and column) LSEs from the core, positives in PyTorch."""
    q, q32 = _normalized_like(query, normalize)
    k, k32 = _normalized_like(key, normalize)
    scale = _inv_tau(temperature, q)
    if symmetric:
        row_lse, col_lse = core.sim_lse(q, _keys(k), scale, want_col=True, backend=backend)
        pos = _rowdot(q32, k32) * scale
        loss = 0.5 * ((row_lse - pos) + (col_lse - pos))
    else:
        row_lse, _ = core.sim_lse(q, _keys(k), scale, backend=backend)
        t = torch.arange(q.shape[0], device=q.device) if targets is None else targets.long()
        pos = _rowdot(q32, k32.index_select(0, t)) * scale
        loss = row_lse - pos
    return reduce(loss, reduction)


def info_nce(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
             reduction="mean", backend="auto", process_group=None) -> Tensor:
    r"""InfoNCE of queries against keys.

    ``ℓ_i = −s(q_i, k_{t_i}) + LSE_j s(q_i, k_j)`` with ``s(a,b) = â·b̂/τ``
    (``normalize=True``) or ``a·b/τ``.

    Args:
        query: (B, D) floating tensor.
        key: (M, D), same device and dtype.
        temperature: τ > 0, float or 0-dim tensor (a tensor requiring grad gets its gradient).
        targets: (B,) int64, index of each query's positive key; default ``arange(B)`` (needs M ≥ B).
        symmetric: ½(row loss + column loss) as in CLIP; needs M == B and no targets.
        normalize: L2-normalize query and key rows first (eps 1e-12, in fp32).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ((B,) per-query values).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        fp32 loss (float64 for float64 inputs); gradients in the input dtype.
    """
    _check_pair("query", query, "key", key, same_rows=False)
    check_reduction(reduction)
    B, M = query.shape[0], key.shape[0]
    if symmetric:
        if targets is not None:
            raise ValueError(
                f"symmetric=True uses the diagonal as positives and takes no targets (got targets of shape "
                f"{shape_str(targets)}, query {shape_str(query)}, key {shape_str(key)})"
            )
        if M != B:
            raise ValueError(
                f"symmetric=True needs as many keys as queries, got query {shape_str(query)} and key {shape_str(key)}"
            )
    elif targets is not None:
        targets = _check_targets(targets, B, M, query.device)
    elif M < B:
        raise ValueError(
            f"without targets the positive of query i is key i, so key needs at least as many rows as query; "
            f"got query {shape_str(query)} and key {shape_str(key)}"
        )
    as_scalar("temperature", temperature, query, positive=True)
    _check_no_process_group(process_group)
    name = backends.resolve(backend, op="info_nce", tensors=(query, key))
    kw = dict(targets=targets, symmetric=symmetric, normalize=normalize, reduction=reduction)
    if name == "reference":
        return info_nce_reference(query, key, temperature, **kw)
    return _fused_info_nce(query, key, temperature, backend=name, **kw)


# --------------------------------------------------------------------------- clip_loss


def clip_loss_reference(image_features, text_features, logit_scale) -> Tensor:
    """Dense CLIP loss: ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)] (stores B×B)."""
    dt = acc_dtype(image_features.dtype)
    img, txt = image_features.to(dt), text_features.to(dt)
    s = as_scalar("logit_scale", logit_scale, img)
    logits = s * (img @ txt.T)
    # log-softmax over texts for each image (rows) and over images for each text (columns).
    row = logits.logsumexp(1) - logits.diagonal()
    col = logits.logsumexp(0) - logits.diagonal()
    return 0.5 * (row.mean() + col.mean())


def _fused_clip_loss(image_features, text_features, logit_scale, *, backend: str) -> Tensor:
    """CLIP loss on one core call: the row LSEs are the image→text terms, the column LSEs text→image."""
    img, img32 = _normalized_like(image_features, False)
    txt, txt32 = _normalized_like(text_features, False)
    s = as_scalar("logit_scale", logit_scale, img)
    row_lse, col_lse = core.sim_lse(img, _keys(txt), s, want_col=True, backend=backend)
    pos = _rowdot(img32, txt32) * s
    return 0.5 * ((row_lse - pos).mean() + (col_lse - pos).mean())


def clip_loss(image_features, text_features, logit_scale, *, backend="auto", process_group=None) -> Tensor:
    r"""open_clip ``ClipLoss``: ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)].

    Args:
        image_features, text_features: (B, D) each, same device and dtype; not normalized here.
        logit_scale: s > 0, already exponentiated (as open_clip passes it), float or 0-dim tensor.
        backend: see ``info_nce``.

    Returns:
        0-dim fp32 loss (float64 for float64 inputs).
    """
    _check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
    as_scalar("logit_scale", logit_scale, image_features, positive=True)
    _check_no_process_group(process_group)
    name = backends.resolve(backend, op="clip_loss", tensors=(image_features, text_features))
    if name == "reference":
        return clip_loss_reference(image_features, text_features, logit_scale)
    return _fused_clip_loss(image_features, text_features, logit_scale, backend=name)


# --------------------------------------------------------------------------- nt_xent


def nt_xent_reference(z1, z2, temperature=0.5, *, normalize=True, reduction="mean") -> Tensor:
    """Dense NT-Xent over the 2N anchors of Z = cat(z1, z2) (stores 2N×2N)."""
    Z = torch.cat([_normalized_acc(z1, normalize), _normalized_acc(z2, normalize)], 0)
    n2 = Z.shape[0]
    N = n2 // 2
    S = (Z @ Z.T) * _inv_tau(temperature, Z)
    self_pair = torch.eye(n2, dtype=torch.bool, device=S.device)
    denom = S.masked_fill(self_pair, float("-inf")).logsumexp(1)
    partner = (torch.arange(n2, device=S.device) + N) % n2
    pos = S.gather(1, partner[:, None]).squeeze(1)
    return reduce(denom - pos, reduction)


def _fused_nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend: str) -> Tensor:
    """NT-Xent on ``core.sim_lse(Z, Z)`` with the self pair excluded; positives in PyTorch."""
    (a, a32), (b, b32) = _normalized_like(z1, normalize), _normalized_like(z2, normalize)
    Z = torch.cat([a, b], 0)
    n2 = Z.shape[0]
    N = n2 // 2
    scale = _inv_tau(temperature, Z)
    idx = torch.arange(n2, device=Z.device)
    row_lse, _ = core.sim_lse(Z, _keys(Z), scale, exclude=idx[:, None], backend=backend)
    pos = _rowdot(torch.cat([a32, b32], 0), torch.cat([b32, a32], 0)) * scale
    return reduce(row_lse - pos, reduction)


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
            process_group=None) -> Tensor:
    r"""SimCLR NT-Xent (lightly ``NTXentLoss``) over the 2N anchors of two views.

    Each anchor's positive is its other view; the denominator holds all 2N−1
    other embeddings, the positive included.

    Args:
        z1, z2: (N, D) each, same device and dtype.
        temperature: τ > 0, float or 0-dim tensor.
        normalize: L2-normalize first (eps 1e-12, in fp32).
        reduction: ``"mean"`` (over the 2N anchors), ``"sum"`` or ``"none"`` ((2N,), view-1 anchors then view-2).
        backend: see ``info_nce``.
    """
    _check_pair("z1", z1, "z2", z2, same_rows=True)
    check_reduction(reduction)
    as_scalar("temperature", temperature, z1, positive=True)
    _check_no_process_group(process_group)
    name = backends.resolve(backend, op="nt_xent", tensors=(z1, z2))
    kw = dict(normalize=normalize, reduction=reduction)
    if name == "reference":
        return nt_xent_reference(z1, z2, temperature, **kw)
    return _fused_nt_xent(z1, z2, temperature, backend=name, **kw)


# --------------------------------------------------------------------------- similarity_lse


def similarity_lse_reference(query, key, scale) -> Tensor:
    """Dense row LSE of scale·Q Kᵀ (stores B×M)."""
    dt = acc_dtype(query.dtype)
    q, k = query.to(dt), key.to(dt)
    return ((q @ k.T) * as_scalar("scale", scale, q)).logsumexp(1)


def _fused_similarity_lse(query, key, scale, *, backend: str) -> Tensor:
    row_lse, _ = core.sim_lse(query, _keys(key), as_scalar("scale", scale, query), backend=backend)
    return row_lse


def similarity_lse(query, key, scale, *, backend="auto", process_group=None) -> Tensor:
    r"""Row-wise ``LSE_j(scale · q_i·k_j)`` as a (B,) fp32 tensor, differentiable.

    Kernel backends never store the B×M matrix: the building block for custom losses.

    Args:
        query: (B, D); key: (M, D), same device and dtype.
        scale: > 0, float or 0-dim tensor (a tensor requiring grad gets its gradient).
        backend: see ``info_nce``.
    """
    _check_pair("query", query, "key", key, same_rows=False)
    as_scalar("scale", scale, query, positive=True)
    _check_no_process_group(process_group)
    name = backends.resolve(backend, op="similarity_lse", tensors=(query, key))
    if name == "reference":
        return similarity_lse_reference(query, key, scale)
    return _fused_similarity_lse(query, key, scale, backend=name)


__all__ = ["info_nce", "clip_loss", "nt_xent", "similarity_lse"]
