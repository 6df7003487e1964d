"""The backends a machine must have: ``$CONTRASTIVE_OPS_REQUIRE_BACKENDS``.

A comma-separated subset of ``cpu``, ``triton``, ``cuda`` (``.ci/run`` sets
all three).  Without it, a backend that cannot load makes its tests skip with
the reason; with it, the missing backend fails here, and its parametrized
tests fail instead of skipping (``helpers.backend_params``).

* ``cpu``: the extension's C++ kernels load and compute ``similarity_lse``.
* ``triton``: the Triton backend is available and computes ``similarity_lse``
  (on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1``).
* ``cuda``: the extension was built with its CUDA kernels and every op that
  has a CPU kernel has a CUDA kernel registered too; on a machine with a GPU
  the backend must also be available.
"""
import os

import pytest
import torch

import contrastive_ops as co
from helpers import DEVICE, REQUIRED_BACKENDS

KNOWN = ("cpu", "triton", "cuda")


def test_required_backend_names_are_known():
    unknown = set(REQUIRED_BACKENDS) - set(KNOWN)
    assert not unknown, f"$CONTRASTIVE_OPS_REQUIRE_BACKENDS names unknown backends {sorted(unknown)}; known: {KNOWN}"


def _required(name):
    if name not in REQUIRED_BACKENDS:
        pytest.skip(f"{name} is not in $CONTRASTIVE_OPS_REQUIRE_BACKENDS ({','.join(REQUIRED_BACKENDS) or 'unset'})")


def _computes_similarity_lse(backend, device):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 7, generator=g).to(device), torch.randn(6, 7, generator=g).to(device)
    out = co.similarity_lse(q, k, 2.0, backend=backend)
    torch.testing.assert_close(out, co.similarity_lse(q, k, 2.0, backend="reference"), atol=1e-5, rtol=1e-5)


def test_cpu_backend_is_there():
    _required("cpu")
    ok, why = co.available_backends()["cpu"]
    assert ok, f"the cpu backend is required here but not available: {why}"
    _computes_similarity_lse("cpu", "cpu")


def test_triton_backend_is_there():
    _required("triton")
    ok, why = co.available_backends()["triton"]
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "without a GPU the Triton backend runs under TRITON_INTERPRET=1"
    assert ok, f"the triton backend is required here but not available: {why}"
    _computes_similarity_lse("triton", DEVICE)


def test_cuda_kernels_are_compiled_and_registered():
    _required("cuda")
    from contrastive_ops import _ext
    from contrastive_ops.backends import _cext

    _cext.ensure_loaded()
    assert _ext.with_cuda(), "the cuda backend is required here but contrastive_ops._C was built without CUDA kernels"
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("contrastive_ops::")]
    # Ops named with a leading underscore are test hooks; the "_*_tiled_*" ones run the CUDA host
    # tiling on CPU (csrc/cpu/sim_lse_tiled.cpp) and have no CUDA kernel by design.
    # The ops of the CPU-only primitives (_cext.CPU_ONLY_OPS) have no CUDA kernel by design either; the cuda
    # backend must then not offer their primitives.
    cpu_ops = [o for o in ops if torch._C._dispatch_has_kernel_for_dispatch_key(o, "CPU")
               and not o.split("::", 1)[1].startswith("_") and o.split("::", 1)[1] not in _cext.CPU_ONLY_OPS]
    from contrastive_ops.backends import cuda as cuda_backend

    offered = set(_cext.CPU_ONLY_PRIMITIVES) & set(cuda_backend.PRIMITIVES)
    assert not offered, f"the cuda backend offers CPU-only primitives: {sorted(offered)}"
    assert {f"contrastive_ops::{n}" for n in _cext.CPU_ONLY_OPS} <= set(ops), "a CPU-only op is not registered"
    assert cpu_ops, f"no contrastive_ops op has a CPU kernel: {ops}"
    missing = [o for o in cpu_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(o, "CUDA")]
    assert not missing, f"ops with a CPU kernel but no CUDA kernel registered: {missing}"
    if torch.cuda.is_available():
        ok, why = co.available_backends()["cuda"]
        assert ok, f"a GPU is here but the cuda backend is not available: {why}"
        _computes_similarity_lse("cuda", "cuda")
