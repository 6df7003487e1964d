"""``torch.nn.Module`` wrappers of the functional losses.

Constructors take the hyperparameters (the keyword arguments of the function,
``backend`` included) plus ``gather_distributed=False``; ``forward`` takes the
tensors.  ``gather_distributed=True`` passes the default process group
(``torch.distributed.group.WORLD``) to the function, which then computes the
loss of this rank's anchors against the global batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .losses.decoupled import dcl_loss, dhel_loss
from .losses.info_nce import clip_loss, info_nce, nt_xent
from .losses.multiview import mv_dhel, mv_infonce
from .losses.point_token import point_token_contrast
from .losses.selfcon import selfcon_loss
from .losses.siglip import siglip_loss
from .losses.supcon import supcon_loss
from .losses.supremix import supremix_loss
from .losses.swav import sinkhorn_knopp, swav_loss

__all__ = [
    "InfoNCELoss",
    "ClipLoss",
    "SigLIPLoss",
    "NTXentLoss",
    "DCLLoss",
    "DHELLoss",
    "MVInfoNCELoss",
    "MVDHELLoss",
    "SupConLoss",
    "SwAVLoss",
    "SinkhornKnopp",
    "PointTokenContrastLoss",
    "SelfConLoss",
    "SupReMixLoss",
]


def _group(gather_distributed: bool):
    if not gather_distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_distributed=True needs torch.distributed to be initialized")
    return dist.group.WORLD


class _LossModule(torch.nn.Module):
    """Stores keyword hyperparameters and forwards them to ``_fn``."""

    _fn = None

    def __init__(self, *, gather_distributed: bool = False, **kwargs):
        super().__init__()
        self.gather_distributed = bool(gather_distributed)
        self.kwargs = kwargs

    def _call(self, *tensors):
        return type(self)._fn(*tensors, process_group=_group(self.gather_distributed), **self.kwargs)

    def extra_repr(self) -> str:
        items = dict(self.kwargs, gather_distributed=self.gather_distributed)
        return ", ".join(f"{k}={v!r}" for k, v in items.items())


class InfoNCELoss(_LossModule):
    """``info_nce`` as a module; ``learnable_temperature=True`` owns ``log_temperature``."""

    _fn = staticmethod(info_nce)

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", learnable_temperature: bool = False,
                 gather_distributed: bool = False):
        super().__init__(symmetric=symmetric, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(float(temperature))))
        else:
            self.temperature = float(temperature)

    def forward(self, query, key, targets=None):
        t = self.log_temperature.exp() if self.learnable_temperature else self.temperature
        return info_nce(query, key, t, targets=targets, process_group=_group(self.gather_distributed),
                        **self.kwargs)


class ClipLoss(_LossModule):
    _fn = staticmethod(clip_loss)

    def __init__(self, *, backend: str = "auto", gather_distributed: bool = False):
        super().__init__(backend=backend, gather_distributed=gather_distributed)

    def forward(self, image_features, text_features, logit_scale):
        return self._call(image_features, text_features, logit_scale)


class SigLIPLoss(_LossModule):
    _fn = staticmethod(siglip_loss)

    def __init__(self, *, backend: str = "auto", gather_distributed: bool = False):
        super().__init__(backend=backend, gather_distributed=gather_distributed)

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return self._call(image_features, text_features, logit_scale, logit_bias)


class NTXentLoss(_LossModule):
    _fn = staticmethod(nt_xent)

    def __init__(self, temperature: float = 0.5, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, z1, z2):
        return self._call(z1, z2)


class DCLLoss(_LossModule):
    _fn = staticmethod(dcl_loss)

    def __init__(self, temperature: float = 0.1, *, weighted: bool = False, sigma: float = 0.5,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, weighted=weighted, sigma=sigma, normalize=normalize,
                         reduction=reduction, backend=backend, gather_distributed=gather_distributed)

    def forward(self, z1, z2):
        return self._call(z1, z2)


class DHELLoss(_LossModule):
    _fn = staticmethod(dhel_loss)

    def __init__(self, temperature: float = 0.3, *, include_augs: bool = True, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, include_augs=include_augs, normalize=normalize,
                         reduction=reduction, backend=backend, gather_distributed=gather_distributed)

    def forward(self, z1, z2):
        return self._call(z1, z2)


class MVInfoNCELoss(_LossModule):
    _fn = staticmethod(mv_infonce)

    def __init__(self, temperature: float = 0.1, *, variant: str = "mv", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, variant=variant, normalize=normalize, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed)

    def forward(self, features, mask: Optional[torch.Tensor] = None):
        return type(self)._fn(features, mask=mask, process_group=_group(self.gather_distributed), **self.kwargs)


class MVDHELLoss(_LossModule):
    _fn = staticmethod(mv_dhel)

    def __init__(self, temperature: float = 0.2, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, mask: Optional[torch.Tensor] = None):
        return type(self)._fn(features, mask=mask, process_group=_group(self.gather_distributed), **self.kwargs)


class SupConLoss(_LossModule):
    _fn = staticmethod(supcon_loss)

    def __init__(self, temperature: float = 0.07, *, base_temperature: float = 0.07, contrast_mode: str = "all",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, base_temperature=base_temperature, contrast_mode=contrast_mode,
                         normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, labels: Optional[torch.Tensor] = None):
        return self._call(features, labels)


class SelfConLoss(_LossModule):
    """``selfcon_loss`` as a module: ``forward(features, labels=None)``, features (N, V, D) backbone last."""

    _fn = staticmethod(selfcon_loss)

    def __init__(self, temperature: float = 0.07, *, base_temperature: float = 0.07, alpha: float = 0.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, base_temperature=base_temperature, alpha=alpha,
                         normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, labels: Optional[torch.Tensor] = None):
        return self._call(features, labels)


class SupReMixLoss(_LossModule):
    """``supremix_loss`` as a module: ``forward(features, labels, mix_lambda=None)``."""

    _fn = staticmethod(supremix_loss)

    def __init__(self, temperature: float = 0.5, *, base_temperature: Optional[float] = None, window: float = 5,
                 beta=(2.0, 8.0), mix_neg: bool = True, mix_pos: bool = True, use_weight: bool = True,
                 distance: str = "L1_inv", normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, base_temperature=base_temperature, window=window,
                         beta=tuple(beta), mix_neg=mix_neg, mix_pos=mix_pos, use_weight=use_weight,
                         distance=distance, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, labels: torch.Tensor, mix_lambda=None):
        return type(self)._fn(features, labels, mix_lambda=mix_lambda, process_group=_group(self.gather_distributed),
                              **self.kwargs)


class SwAVLoss(_LossModule):
    _fn = staticmethod(swav_loss)

    def __init__(self, temperature: float = 0.1, *, crops_for_assign=(0, 1), epsilon: float = 0.05,
                 iterations: int = 3, backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, crops_for_assign=tuple(crops_for_assign), epsilon=epsilon,
                         iterations=iterations, backend=backend, gather_distributed=gather_distributed)

    def forward(self, scores):
        return self._call(scores)


class SinkhornKnopp(_LossModule):
    _fn = staticmethod(sinkhorn_knopp)

    def __init__(self, epsilon: float = 0.05, iterations: int = 3, *, backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(epsilon=epsilon, iterations=iterations, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, scores):
        return self._call(scores)


class PointTokenContrastLoss(_LossModule):
    _fn = staticmethod(point_token_contrast)

    def __init__(self, *, mode: str = "infonce", temperature: float = 0.1, pairing: str = "diag",
                 negatives: str = "cloud", backend: str = "auto", gather_distributed: bool = False):
        super().__init__(mode=mode, temperature=temperature, pairing=pairing, negatives=negatives,
                         backend=backend, gather_distributed=gather_distributed)

    def forward(self, f1, f2, mask1, mask2):
        return self._call(f1, f2, mask1, mask2)
