"""Backend ``"cuda"``: the CUDA kernels of ``contrastive_ops._C`` on CUDA tensors.

Tiled GEMMs through cuBLAS (ATen; tensor cores with fp32 accumulation for
fp16/bf16) plus small CUDA epilogue kernels (``csrc/cuda/``); never stores the
B×M similarity matrix.
"""
from __future__ import annotations

from . import _cext

PRIMITIVES = _cext.PRIMITIVES


def availability():
    return _cext.availability("cuda")


def devices():
    return {"cuda"}


def dtypes():
    return set(_cext.DTYPES)
