"""Backend ``"cpu"``: the C++ kernels of ``contrastive_ops._C`` on CPU tensors.

Similarity-LSE core: each thread owns row blocks (or tile pairs of the
symmetric Gram when q is k), runs single-threaded BLAS GEMMs on cache-sized
tiles with fused, vectorized epilogues and keeps its own column partials
(``csrc/cpu/sim_lse.cpp``); with a row threshold (``row_max``) the general
row-block kernels run, forward and backward alike, instead of the symmetric
Gram.  SigLIP (``csrc/cpu/siglip.cpp``): tiled GEMMs through ATen with
multithreaded epilogues.  Never stores the B×M similarity
matrix.  SwAV: the
Sinkhorn codes and the swapped-prediction cross-entropy (``"swav_ce"``), each
one pass per row.  ``"sim_expect"`` (CACR's repulsion, ``csrc/cpu/sim_expect.cpp``): row blocks
of one GEMM each and their row statistics; CPU only.  ``"label_lse"`` (SupReMix's weighted LSE,
``csrc/cpu/label_lse.cpp``): the same row and column blocks with the label log-weight per tile; CPU only.  PixPro's masked pixel sum (``"pix_pos_sum"``) and
PixContrast's two LSEs (``"pix_pos_lse"``), ``csrc/cpu/pix_pos.cpp``: the
positive predicate evaluated per pair from the crop geometry.  Hydra's filter gating
(``"gated_lse"``, ``csrc/cpu/gated_lse.cpp``): tiles of two GEMMs each (a·kᵀ and w·(k⊙k)ᵀ) with an
online LSE per row over its column range; CPU only.
"""
from __future__ import annotations

from collections import ChainMap

from . import _cext

# A live view of both tables (the extension's primitives first): what is installed in
# ``_cext.PRIMITIVES`` (the CUDA backend's table too) is what this backend serves.
PRIMITIVES = ChainMap(_cext.PRIMITIVES, _cext.CPU_ONLY_PRIMITIVES)


def availability():
    return _cext.availability("cpu")


def devices():
    return {"cpu"}


def dtypes():
    return set(_cext.DTYPES)
