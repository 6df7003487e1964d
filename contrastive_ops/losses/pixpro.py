r"""PixPro and PixContrast: pixel-level contrast of two crops (Xie et al. 2021, "Propagate Yourself", arXiv 2011.10043).

Official code: zdaxie/PixPro, ``contrast/models/PixPro.py`` (@6689c38):
``regression_loss`` and ``PixPro.forward``.  PixContrast has no released code.

Inputs and positives
--------------------
Feature maps are (N, C, H, W) for two crops (views) of each of N images, with
boxes ``coord1``, ``coord2`` (N, 4) = (x_upper_left, y_upper_left,
x_lower_right, y_lower_right) in original-image coordinates, as PixPro's data
pipeline passes them.  Pixel p = r·W + a.  Pixel i of one view and pixel j of
the other view of the *same* image are positive when the distance of their
bin centres divided by the larger of the two views' bin diagonals is below
``pos_ratio`` (``pos_ij``; ``contrastive_ops.primitives.pix_pos`` gives the
formulas, the same operations as the code, so the same mask bit for bit).
û = u/max(‖u‖, 1e-12) over C when ``normalize`` (the code normalizes the
maps before the loss).

PixPro (the code)
-----------------
y = ``pred_*`` (the online branch after the pixel-propagation module),
x' = ``proj_*_ng`` (the momentum encoder's projection: stop-grad, detached
here as the code computes it under ``torch.no_grad()``)::

    R_b(y, x', c, c') = Σ_{i,j} pos_ij · ŷ_i·x̂'_j / (Σ_{i,j} pos_ij + 1e-6)
    ℓ_b = −2·[ R_b(pred_1, proj_2_ng, coord1, coord2) + R_b(pred_2, proj_1_ng, coord2, coord1) ]
    L   = mean_b ℓ_b                      (``reduction="none"``: ℓ as (N,))

Code and paper differ; we follow the code: the paper's loss is the negative
cosine averaged per pixel over its positives; the code sums over all
positive pairs of an image and divides by the image's number of pairs (a
pixel with more positives weighs more), scales by −2 and *adds* the two
directions.  An image whose crops have no positive pair gives 0 (0/1e-6).
``pos_ratio`` defaults to 0.7, the value of every released training script
(``--pixpro-pos-ratio 0.7``; ``regression_loss``'s own default is 0.5).

PixContrast (the paper, §3.1)
-----------------------------
x = ``proj_*`` (online), x' = ``proj_*_ng`` (momentum encoder, detached), τ
= ``temperature`` (0.3 in the paper), s(u, v) = û·v̂/τ::

    ℓ_i = −log[ Σ_{j∈A_p^i} e^{s(x_i,x'_j)} / (Σ_{j∈A_p^i} e^{s(x_i,x'_j)} + Σ_{k∈A_n^i} e^{s(x_i,x'_k)}) ]
        = LSE_{A_p^i ∪ A_n^i} s(x_i, ·) − LSE_{A_p^i} s(x_i, ·)

with the positives summed inside the log.  A_p^i = {j : pos_ij} in the other
view of the same image.  Negatives: the paper defines A_p^i and A_n^i as "the
positive and negative pixel sets in the second view with respect to pixel i",
so ``negatives="image"`` (default) takes A_n^i = the other pixels of the
other view of the same image; ``negatives="batch"`` adds every pixel of the
other images' other views (in-batch negatives in the MoCo manner, not in the
paper; under a ``process_group`` the global batch's).  Both views serve as
anchors (view 1 against view 2's keys, view 2 against view 1's, as PixPro
symmetrizes), and the loss is the mean over all anchors that have at least
one positive; a pixel whose position falls outside the other crop has none
and leaves the mean (never inf).  ``reduction="none"`` gives (2·N·H·W,):
view-1 anchors (image-major, pixels in row-major order) then view-2 anchors,
0 for anchors without positive.  No anchor with a positive: 0, in the graph.

Fused compositions (never a (HW)²·N tensor)
-------------------------------------------
PixPro is linear in x̂': Σ_{i,j} pos_ij ŷ_i·x̂'_j = Σ_i ŷ_i·Z_i with
Z_i = Σ_j pos_ij x̂'_j.  The primitive ``"pix_pos_sum"`` returns Z (N, HW, C)
and the per-pixel positive counts, evaluating pos per tile; the rest is
O(N·HW·C) PyTorch, and autograd of ŷ_i·Z_i gives the exact gradient
Z_i/(Σpos + 1e-6) (x' is stop-grad, so no backward kernel runs).  No exp is
involved, and the C++ kernel accumulates only the positive pairs (a few per
pixel): (HW)² predicate evaluations plus #pos·C multiply-adds per image,
instead of the (HW)²·C of the dense logits.
PixContrast: one call of ``"pix_pos_lse"`` per direction returns both LSEs
per anchor (two online LSEs over the same tiles); the backward kernel gives
the anchors' and the temperature's gradients.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _checks, backends
from .._numerics import acc_dtype, masked_lse
from ..distributed import GlobalBatch, reduce
from ..primitives.pix_pos import geometry, pix_pos_lse, pix_pos_sum, pos_mask
from ._common import inv_temperature, unit

Tensor = torch.Tensor

NEGATIVES = ("image", "batch")
PIXPRO_EPS = 1e-6  # the code's ``pos_mask.sum() + 1e-6``


def _pixels(x: Tensor, normalize: bool) -> Tensor:
    """(N, C, H, W) -> (N, H·W, C) in the accumulation dtype, normalized over C when ``normalize``."""
    return unit(x.flatten(2).transpose(1, 2), normalize)


def _ratio(pos_ratio: float, coord: Tensor) -> Tensor:
    return torch.tensor(float(pos_ratio), dtype=coord.dtype, device=coord.device)


# ----------------------------------------------------------------------------- checks


def _check_inputs(names, maps, coords, pos_ratio, normalize, reduction, backend) -> Tuple[int, int, int]:
    for n, t in zip(names[:4], maps):
        _checks.check_features(n, t, ndims=(4,))
    for n, t in zip(names[1:4], maps[1:]):
        _checks.check_same_shape(names[0], maps[0], n, t)
    _checks.check_same_device_dtype(list(zip(names[:4], maps)))
    N, _, H, W = maps[0].shape
    for n, c in zip(names[4:], coords):
        if not isinstance(c, Tensor) or not c.is_floating_point() or tuple(c.shape) != (N, 4):
            got = f"shape {_checks.shape_str(c)}, dtype {c.dtype}" if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{n} must be a floating-point tensor of shape ({N}, 4) = (x_upper_left, y_upper_left, "
                             f"x_lower_right, y_lower_right) per image ({names[0]} has shape "
                             f"{_checks.shape_str(maps[0])}), got {got}")
        if c.device != maps[0].device:
            raise ValueError(f"{n} is on {c.device} but {names[0]} is on {maps[0].device}")
    if coords[0].dtype != coords[1].dtype:
        raise ValueError(f"{names[4]} and {names[5]} must have one dtype, got {coords[0].dtype} and {coords[1].dtype}")
    if isinstance(pos_ratio, bool) or not isinstance(pos_ratio, (int, float)) or not 0 < float(pos_ratio) < float("inf"):
        raise ValueError(f"pos_ratio must be a finite float > 0, got {pos_ratio!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    _checks.check_reduction(reduction)
    if backend is not None:
        backends._check_name(backend)
    return N, H, W


# ----------------------------------------------------------------------------- PixPro


def pixpro_reference(pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2, *, pos_ratio: float = 0.7,
                     normalize: bool = True) -> Tensor:
    """Per-image PixPro values ℓ (N,), densely: the (N, HW, HW) logits and mask of the code."""
    N, C, H, W = pred_1.shape
    dt = acc_dtype(pred_1.dtype)
    out = torch.zeros(N, dtype=dt, device=pred_1.device)
    for y, k, cq, ck in ((pred_1, proj_2_ng, coord1, coord2), (pred_2, proj_1_ng, coord2, coord1)):
        q = _pixels(y, normalize)
        x = _pixels(k.detach(), normalize)
        dx, dy, dg = geometry(cq.detach(), ck.detach(), H, W)
        pos = pos_mask(dx, dy, dg, _ratio(pos_ratio, cq), H, W).to(dt)  # (N, HW, HW)
        logit = torch.bmm(q, x.transpose(1, 2))
        out = out + (logit * pos).sum((1, 2)) / (pos.sum((1, 2)) + PIXPRO_EPS)
    return -2 * out


def _pixpro_fused(pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2, *, pos_ratio, normalize,
                  backend) -> Tensor:
    """Per-image values (N,) on ``"pix_pos_sum"``: Z = Σ_j pos_ij x̂'_j from the kernel, ŷ·Z in PyTorch."""
    N, C, H, W = pred_1.shape
    dt = acc_dtype(pred_1.dtype)
    out = torch.zeros(N, dtype=dt, device=pred_1.device)
    for y, k, cq, ck in ((pred_1, proj_2_ng, coord1, coord2), (pred_2, proj_1_ng, coord2, coord1)):
        q = _pixels(y, normalize)  # (N, HW, C) in dt, with gradient
        x = _pixels(k.detach(), normalize).to(k.dtype)  # the kernel reads the input dtype
        dx, dy, dg = geometry(cq.detach(), ck.detach(), H, W)
        Z, cnt = pix_pos_sum(x, dx, dy, dg, _ratio(pos_ratio, cq), H, W, backend=backend)
        out = out + (q * Z.to(dt)).sum((1, 2)) / (cnt.to(dt).sum(1) + PIXPRO_EPS)
    return -2 * out


def pixpro_loss(
    pred_1: Tensor,
    pred_2: Tensor,
    proj_1_ng: Tensor,
    proj_2_ng: Tensor,
    coord1: Tensor,
    coord2: Tensor,
    *,
    pos_ratio: float = 0.7,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    r"""PixPro's pixel-propagation consistency loss (zdaxie/PixPro ``regression_loss``, both directions added).

    Args:
        pred_1, pred_2: (N, C, H, W) online maps of views 1 and 2 after the pixel-propagation module.
        proj_1_ng, proj_2_ng: (N, C, H, W) momentum-encoder projections of views 1 and 2 (detached here).
        coord1, coord2: (N, 4) crop boxes (x_ul, y_ul, x_lr, y_lr) in original-image coordinates.
        pos_ratio: positive when the bin-centre distance / the larger bin diagonal < pos_ratio.
        normalize: L2-normalize every pixel feature over C (the code passes normalized maps).
        reduction: ``"mean"`` (the code's value), ``"sum"`` or ``"none"`` ((N,) per image).
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"`` (``"cuda"`` does not implement
            the ``"pix_pos_sum"`` primitive and raises).

    Returns:
        The loss in fp32 (float64 for float64 inputs)::

            view 1 crop ┌────────┐          ℓ_b = −2·Σ_{pos pairs} cos(pred, proj_ng) / #pos pairs,
                        │   ┌────┼───┐      both directions added; pairs whose bin centres are
                        └───┼────┘   │      closer than pos_ratio · bin diagonal are positive
                 view 2 crop└────────┘

    Maths and where the code differs from the paper: module docstring of
    ``contrastive_ops.losses.pixpro``.  Under ``process_group`` each rank passes
    its images; the mean is over the global batch.
    """
    names = ("pred_1", "pred_2", "proj_1_ng", "proj_2_ng", "coord1", "coord2")
    _check_inputs(names, (pred_1, pred_2, proj_1_ng, proj_2_ng), (coord1, coord2), pos_ratio, normalize,
                  reduction, backend)
    name = backends.resolve(backend, op="pixpro_loss", tensors=(pred_1,))
    args = (pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2)
    if name == "reference":
        per = pixpro_reference(*args, pos_ratio=pos_ratio, normalize=normalize)
    else:
        per = _pixpro_fused(*args, pos_ratio=pos_ratio, normalize=normalize, backend=name)
    # Images are independent: the global mean needs only the global count.
    return reduce(per, reduction, process_group)


def released_pos_mask(coord_q: Tensor, coord_k: Tensor, H: int, W: int, pos_ratio: float,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The released code's positive mask (N, HW, HW), transcribed operation by operation (same order).

    zdaxie/PixPro, contrast/models/PixPro.py, ``regression_loss``, commit
    6689c383d559f507b429fc73fb08388139916f2e.  The code casts the mask with
    ``.float()``; ``dtype`` lets a float64 run stay in float64 (the fp32 mask
    makes the code's ``count + 1e-6`` an fp32 sum).  Kept as a peer for tests
    and benchmarks (it stores several (N, HW, HW) tensors).
    """
    dev, dt = coord_q.device, coord_q.dtype
    cols = torch.arange(0.0, float(W), dtype=dt, device=dev).view(1, 1, -1).repeat(1, H, 1)
    rows = torch.arange(0.0, float(H), dtype=dt, device=dev).view(1, -1, 1).repeat(1, 1, W)

    def box(c):
        bw = ((c[:, 2] - c[:, 0]) / W).view(-1, 1, 1)
        bh = ((c[:, 3] - c[:, 1]) / H).view(-1, 1, 1)
        diag = torch.sqrt(bw ** 2 + bh ** 2)
        cx = (cols + 0.5) * bw + c[:, 0].view(-1, 1, 1)
        cy = (rows + 0.5) * bh + c[:, 1].view(-1, 1, 1)
        return cx, cy, diag

    qx, qy, qd = box(coord_q)
    kx, ky, kd = box(coord_k)
    dist = torch.sqrt((qx.view(-1, H * W, 1) - kx.view(-1, 1, H * W)) ** 2
                      + (qy.view(-1, H * W, 1) - ky.view(-1, 1, H * W)) ** 2) / torch.max(qd, kd)
    return (dist < pos_ratio).to(dtype).detach()


def released_regression_loss(q: Tensor, k: Tensor, coord_q: Tensor, coord_k: Tensor, pos_ratio: float = 0.5) -> Tensor:
    """The released loss of one direction (same source): q, k (N, C, H, W) already normalized over C;
    the (N, HW, HW) logits and mask, per image the sum over positive pairs / (their count + 1e-6),
    −2 · the batch mean."""
    N, C, H, W = q.shape
    qf, kf = q.view(N, C, -1), k.view(N, C, -1)
    mask = released_pos_mask(coord_q, coord_k, H, W, pos_ratio, q.dtype)
    logit = torch.bmm(qf.transpose(1, 2), kf)
    loss = (logit * mask).sum(-1).sum(-1) / (mask.sum(-1).sum(-1) + 1e-6)
    return -2 * loss.mean()


def pixpro_released_loss(pred_1: Tensor, pred_2: Tensor, proj_1_ng: Tensor, proj_2_ng: Tensor, coord1: Tensor,
                         coord2: Tensor, pos_ratio: float = 0.7) -> Tensor:
    """``PixPro.forward``'s pixel loss as released: maps normalized over C, keys without gradient, both
    directions added (a peer for tests and benchmarks; stores (N, HW, HW) tensors)."""
    n = torch.nn.functional.normalize
    p1, p2 = n(pred_1, dim=1), n(pred_2, dim=1)
    with torch.no_grad():
        k1, k2 = n(proj_1_ng, dim=1), n(proj_2_ng, dim=1)
    return (released_regression_loss(p1, k2, coord1, coord2, pos_ratio)
            + released_regression_loss(p2, k1, coord2, coord1, pos_ratio))


# ----------------------------------------------------------------------------- PixContrast


def pixcontrast_reference(proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2, inv_t, *, pos_ratio: float = 0.7,
                          negatives: str = "image", normalize: bool = True, process_group=None):
    """Per-anchor PixContrast values (2·N·HW,) and whether each counts, densely.

    Stores the (N, HW, HW) similarities and mask ("image") or N·HW × N_global·HW ("batch").
    """
    N, C, H, W = proj_1.shape
    dt = acc_dtype(proj_1.dtype)
    gb = GlobalBatch(N, process_group if negatives == "batch" else None, proj_1.device)
    vals, counted = [], []
    for y, k, cq, ck in ((proj_1, proj_2_ng, coord1, coord2), (proj_2, proj_1_ng, coord2, coord1)):
        q = _pixels(y, normalize)  # (N, P, C)
        x = _pixels(k.detach(), normalize)
        dx, dy, dg = geometry(cq.detach(), ck.detach(), H, W)
        pos = pos_mask(dx, dy, dg, _ratio(pos_ratio, cq), H, W)  # (N, P, P)
        S_img = torch.bmm(q, x.transpose(1, 2)) * inv_t.to(dt)
        lse_pos = masked_lse(S_img, pos, 2)
        if negatives == "image":
            lse_all = torch.logsumexp(S_img, 2)
        else:
            X = gb.gather_nograd(x).reshape(-1, C)  # every image's other view
            lse_all = torch.logsumexp((q.reshape(N * H * W, C) @ X.T) * inv_t.to(dt), 1).reshape(N, H * W)
        has = pos.any(2)
        vals.append(torch.where(has, lse_all - torch.where(has, lse_pos, 0), 0).reshape(-1))
        counted.append(has.reshape(-1))
    return torch.cat(vals), torch.cat(counted)


def _pixcontrast_fused(proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2, inv_t, *, pos_ratio, negatives,
                       normalize, backend, process_group=None):
    """Per-anchor values and counted flags on ``"pix_pos_lse"`` (both LSEs from one pass of the kernel)."""
    N, C, H, W = proj_1.shape
    dt = acc_dtype(proj_1.dtype)
    batch = negatives == "batch"
    gb = GlobalBatch(N, process_group if batch else None, proj_1.device)
    vals, counted = [], []
    for y, k, cq, ck in ((proj_1, proj_2_ng, coord1, coord2), (proj_2, proj_1_ng, coord2, coord1)):
        q = _pixels(y, normalize).to(y.dtype)  # the kernels read the input dtype; gradients flow back in dt
        x = _pixels(k.detach(), normalize).to(k.dtype)
        if batch:
            x = gb.gather_nograd(x)  # (N_global, P, C), detached keys: no gradient to send back
        dx, dy, dg = geometry(cq.detach(), ck.detach(), H, W)
        lse_pos, lse_all = pix_pos_lse(q, x, inv_t, dx, dy, dg, _ratio(pos_ratio, cq), H, W, batch_negatives=batch,
                                       offset=gb.offset if batch else 0, backend=backend)
        has = lse_pos > float("-inf")
        vals.append(torch.where(has, lse_all.to(dt) - torch.where(has, lse_pos.to(dt), 0), 0).reshape(-1))
        counted.append(has.reshape(-1))
    return torch.cat(vals), torch.cat(counted)


def pixcontrast_loss(
    proj_1: Tensor,
    proj_2: Tensor,
    proj_1_ng: Tensor,
    proj_2_ng: Tensor,
    coord1: Tensor,
    coord2: Tensor,
    temperature=0.3,
    *,
    pos_ratio: float = 0.7,
    negatives: str = "image",
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    r"""PixContrast (the PixPro paper's pixel-level InfoNCE with several positives summed inside the log).

    Args:
        proj_1, proj_2: (N, C, H, W) online projections of views 1 and 2 (the anchors).
        proj_1_ng, proj_2_ng: (N, C, H, W) momentum-encoder projections (the candidates; detached here).
        coord1, coord2: (N, 4) crop boxes (x_ul, y_ul, x_lr, y_lr) in original-image coordinates.
        temperature: τ (0.3 in the paper); float or 0-dim tensor (receives a gradient).
        pos_ratio: positive when the bin-centre distance / the larger bin diagonal < pos_ratio.
        negatives: ``"image"`` (the paper: the other pixels of the other view of the same image) or
            ``"batch"`` (also every pixel of the other images' other views).
        normalize: L2-normalize every pixel feature over C (cosine similarity, as the paper).
        reduction: ``"mean"`` over the anchors with a positive, ``"sum"``, or ``"none"`` ((2·N·H·W,):
            view-1 anchors then view-2 anchors, 0 for anchors without positive).
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"`` (``"cuda"`` does not implement
            the ``"pix_pos_lse"`` primitive and raises).

    Maths, the choice of negatives and the symmetrization: module docstring of
    ``contrastive_ops.losses.pixpro``.  Under ``process_group`` each rank's
    pixels are its anchors; "batch" gathers the keys (no gradient).
    """
    names = ("proj_1", "proj_2", "proj_1_ng", "proj_2_ng", "coord1", "coord2")
    _check_inputs(names, (proj_1, proj_2, proj_1_ng, proj_2_ng), (coord1, coord2), pos_ratio, normalize,
                  reduction, backend)
    _checks.check_choice("negatives", negatives, NEGATIVES)
    _checks.as_scalar("temperature", temperature, proj_1, positive=True)
    inv_t = inv_temperature(temperature, proj_1)
    name = backends.resolve(backend, op="pixcontrast_loss", tensors=(proj_1,))
    args = (proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2, inv_t)
    kw = dict(pos_ratio=pos_ratio, negatives=negatives, normalize=normalize, process_group=process_group)
    if name == "reference":
        per, counted = pixcontrast_reference(*args, **kw)
    else:
        per, counted = _pixcontrast_fused(*args, backend=name, **kw)
    return reduce(per, reduction, process_group, counted.sum())
