"""contrastive_ops: fused kernels for contrastive losses.

Every loss is a PyTorch function with an exact plain-PyTorch reference
(``backend="reference"``) and fused kernel backends (``"cpu"``, ``"triton"``,
``"cuda"``) that never store the B×M similarity matrix.  See SPEC-level
documentation in README.md.
"""
from __future__ import annotations

from ._version import __version__
from .backends import available_backends, get_backend, set_backend
from .gradcache import GradCache
from .losses.cacr import cacr_loss
from .losses.decoupled import dcl_loss, dhel_loss
from .losses.hydra import hydra_loss
from .losses.info_nce import clip_loss, info_nce, nt_xent, similarity_lse
from .losses.multiview import mv_dhel, mv_infonce
from .losses.pixpro import pixcontrast_loss, pixpro_loss
from .losses.point_token import point_token_contrast
from .losses.selfcon import selfcon_loss
from .losses.sepclr import sepclr_loss
from .losses.siglip import siglip_loss
from .losses.supcon import supcon_loss
from .losses.supremix import supremix_loss
from .losses.swav import sinkhorn_knopp, swav_loss
from . import nn  # noqa: E402  (modules wrap the functions above)

__all__ = [
    "__version__",
    "available_backends",
    "get_backend",
    "set_backend",
    "info_nce",
    "clip_loss",
    "siglip_loss",
    "nt_xent",
    "mv_infonce",
    "mv_dhel",
    "supcon_loss",
    "dcl_loss",
    "dhel_loss",
    "sinkhorn_knopp",
    "swav_loss",
    "point_token_contrast",
    "similarity_lse",
    "selfcon_loss",
    "supremix_loss",
    "sepclr_loss",
    "cacr_loss",
    "pixpro_loss",
    "pixcontrast_loss",
    "hydra_loss",
    "GradCache",
    "nn",
]
