"""The ``"triton"`` kernel backend.

Primitives: ``"sim_lse"`` (the tiled similarity-LSE core, :mod:`.sim_lse`, on the tile library :mod:`.tiles`),
``"sim_expect"`` (the softmax-weighted row mean of the similarities, :mod:`.sim_expect`),
``"siglip"`` (the SigLIP pair sum, :mod:`.siglip`), ``"sinkhorn"`` (the
log-domain Sinkhorn-Knopp scalings, :mod:`.sinkhorn`) and ``"swav_ce"`` (SwAV's
swapped-prediction cross-entropy, :mod:`.swav_ce`), ``"pix_pos_sum"`` and ``"pix_pos_lse"``
(PixPro / PixContrast pixel pairs with positives from crop coordinates, :mod:`.pix_pos`), ``"gated_lse"``
(the row LSE of per-pair gated, normalized similarities of hydra's filter gating, :mod:`.gated_lse`),
``"label_lse"`` (the row LSE of similarities plus a per-pair label-distance log-weight, SupReMix's
weighted denominator, :mod:`.label_lse`).  Runs on CUDA tensors when
Triton has an active GPU driver, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``import triton``).
"""
from __future__ import annotations

import os
from typing import Dict, Set, Tuple

import torch

_IMPORT_ERROR = None
try:
    import triton

    from .gated_lse import GATED_LSE
    from .label_lse import LABEL_LSE
    from .pix_pos import PIX_POS_LSE, PIX_POS_SUM
    from .sim_expect import SIM_EXPECT
    from .sim_lse import SIM_LSE
    from .siglip import SIGLIP
    from .sinkhorn import SINKHORN
    from .swav_ce import SWAV_CE

    PRIMITIVES: Dict[str, object] = {"sim_lse": SIM_LSE, "siglip": SIGLIP, "sinkhorn": SINKHORN, "swav_ce": SWAV_CE,
                                     "sim_expect": SIM_EXPECT, "pix_pos_sum": PIX_POS_SUM, "pix_pos_lse": PIX_POS_LSE}
    PRIMITIVES["gated_lse"] = GATED_LSE
    PRIMITIVES["label_lse"] = LABEL_LSE
except Exception as e:  # noqa: BLE001 - reported by availability()
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    PRIMITIVES = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability() -> Tuple[bool, str]:
    """``(True, what runs)`` or ``(False, why not)``."""
    if _IMPORT_ERROR is not None:
        return False, f"triton kernels cannot be loaded: {_IMPORT_ERROR}"
    if _interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception as e:  # noqa: BLE001 - the reason is reported
        return False, f"triton {triton.__version__} has no active GPU driver ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} sees a {target.backend} GPU but torch.cuda is not available"
    return True, f"triton {triton.__version__} on {target.backend} (arch {target.arch})"


def devices() -> Set[str]:
    """CPU tensors under the interpreter, CUDA tensors otherwise."""
    return {"cpu"} if _interpreting() else {"cuda"}


def dtypes() -> Set[torch.dtype]:
    return {torch.float32, torch.float16, torch.bfloat16}
