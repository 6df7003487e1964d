"""Backend ``"cpu"``: the C++ kernels of ``contrastive_ops._C`` on CPU tensors.

Tiled GEMMs through ATen's BLAS plus vectorized, multithreaded epilogues
(``csrc/cpu/sim_lse.cpp``); never stores the B×M similarity matrix.
"""
from __future__ import annotations

from . import _cext

PRIMITIVES = _cext.PRIMITIVES


def availability():
    return _cext.availability("cpu")


def devices():
    return {"cpu"}


def dtypes():
    return set(_cext.DTYPES)
