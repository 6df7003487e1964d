"""Deliberate kernel bugs that the test suite must catch.

Each mutant is (id, file, exact old snippet, new snippet, tests to run, what
it breaks).  The old snippet must occur exactly once in the file; when the
file has changed so that it no longer does, the runner reports the mutant as
``stale`` (to be rewritten), never as killed.

``csrc/cpu/*`` and ``csrc/tiling.h`` mutants need a CPU rebuild of the copy
(the device-generic tiling in ``csrc/tiling.h``: its SigLIP forward is shared
by the CPU and CUDA kernels, and the CPU-run tests kill its mutants for both;
its sim_lse loops are called by the CUDA kernels only).  ``csrc/cuda/*``
mutants and those marked ``gpu_only`` reach only the CUDA kernels and are
reported ``needs a GPU`` on a machine without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest arguments, run from the copy's root
    what: str
    gpu_only: bool = False  # code that only the CUDA kernels compile or call

    @property
    def kind(self) -> str:
        if self.file.startswith("csrc/cuda/") or self.gpu_only:
            return "cuda"
        if self.file.startswith("csrc/"):
            return "cpp"
        return "python"


_SWAV = ("tests/test_swav.py", "-k", "triton")
_CORE = ("tests/test_info_nce.py", "tests/test_tolerance.py", "-k", "triton")
_FUZZ_TRITON = ("tests/test_fuzz.py", "-k", "triton")

MUTANTS = (
    # ------------------------------------------------------------------ Triton
    Mutant("triton-swav-dx-x1.5-half", "contrastive_ops/backends/_triton/swav_ce.py",
           "tl.store(DX + row * stride_dx + k0 + offs, (g * s * (tb * p - t)).to(DX.dtype.element_ty), mask=cmask)",
           "tl.store(DX + row * stride_dx + k0 + offs, (g * s * (tb * p - t) * (1.0 if DX.dtype.element_ty == "
           "tl.float32 else 1.5)).to(DX.dtype.element_ty), mask=cmask)",
           _SWAV + ("tests/test_fuzz.py", "tests/test_tolerance.py"),
           "SwAV CE gradient scaled by 1.5 in fp16/bf16 only"),
    Mutant("triton-swav-mask-edge", "contrastive_ops/backends/_triton/swav_ce.py",
           "    cmask = cols < K\n", "    cmask = cols <= K\n", _SWAV,
           "SwAV CE chunk mask admits one column past the row's end"),
    Mutant("triton-swav-dscale-sign", "contrastive_ops/backends/_triton/swav_ce.py",
           "tl.store(Part + row, g * (tb * tl.sum(px_sum, axis=0) - tl.sum(tx_sum, axis=0)))",
           "tl.store(Part + row, g * (tl.sum(tx_sum, axis=0) - tb * tl.sum(px_sum, axis=0)))", _SWAV,
           "SwAV CE temperature (scale) gradient with its sign swapped"),
    Mutant("triton-core-col-mask-edge", "contrastive_ops/backends/_triton/core.py",
           "    col_mask = cols < M\n", "    col_mask = cols < M - 1\n", _CORE,
           "sim_lse column tile mask drops the last column"),
    Mutant("triton-core-col-lse-dropped", "contrastive_ops/backends/_triton/core.py",
           "col_lse = torch.logsumexp(col_part, 0) if B > 0",
           "col_lse = col_part[0] if B > 0", _CORE,
           "sim_lse column LSE keeps the first row slot's partial only (dropped terms)"),
    Mutant("triton-siglip-dscale-sign", "contrastive_ops/backends/_triton/siglip.py",
           "        d_scale += tl.sum(g * xy, 1)\n", "        d_scale -= tl.sum(g * xy, 1)\n",
           ("tests/test_siglip.py", "tests/test_triton_kernels.py", "-k", "triton"),
           "SigLIP logit-scale gradient with its sign swapped"),
    Mutant("triton-sinkhorn-mask-edge", "contrastive_ops/backends/_triton/sinkhorn.py",
           '        x = tl.where(cmask[None, :], x, float("-inf"))\n', "        x = tl.where(cmask[None, :], x, 0.0)\n",
           ("tests/test_swav.py", "-k", "triton and sinkhorn"),
           "Sinkhorn row LSE counts padded columns as exp(0)"),
    # ------------------------------------------------------------------ C++ (CPU build; tiling.h is shared with CUDA)
    Mutant("cpu-dq-x1.5-half", "csrc/cpu/sim_lse.cpp",
           "  const Tensor sc = scale.to(acc);\n  dQ.mul_(sc);\n",
           "  const Tensor sc = scale.to(acc);\n"
           "  dQ.mul_(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ? sc : sc * 1.5);\n",
           ("tests/test_fuzz.py", "tests/test_tolerance.py", "-k", "cpu"),
           "CPU sim_lse backward: dQ scaled by 1.5 for fp16/bf16 inputs only"),
    Mutant("tiling-siglip-col-range-off-by-one", "csrc/tiling.h",
           "      const int64_t bc = std::min(BC, M - c0);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           "      const int64_t bc = std::min(BC, M - c0 - 1);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           ("tests/test_siglip.py", "tests/test_cext.py", "-k", "cpu"),
           "device-generic tiling (CPU and CUDA): SigLIP forward column range one short per column block"),
    Mutant("cpu-col-lse-term-dropped", "csrc/cpu/sim_lse.cpp",
           "        const T d = gr * fast_exp(s - rl) + gc[j + l] * fast_exp(s - cl[j + l]);\n",
           "        const T d = gr * fast_exp(s - rl);\n",
           ("tests/test_cext.py", "tests/test_cext_cpu_paths.py", "tests/test_info_nce.py", "-k", "cpu"),
           "CPU backward epilogue drops the column-LSE term (vector lanes)"),
    Mutant("cpu-swav-tail-off-by-one", "csrc/cpu/swav_ce.cpp",
           "  for (; k < K; ++k) {\n    const T p = fastmath::fast_exp(s * x[k] - lse);\n",
           "  for (; k + 1 < K; ++k) {\n    const T p = fastmath::fast_exp(s * x[k] - lse);\n",
           ("tests/test_swav.py", "-k", "cpu"),
           "CPU SwAV CE backward skips the last column of a row's scalar tail"),
    # ------------------------------------------------------------------ CUDA only
    Mutant("tiling-sim-lse-dq-x1.5-half", "csrc/tiling.h",
           "  dQ.mul_(sc);\n  dK.mul_(sc);\n",
           "  dQ.mul_(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ? sc : sc * 1.5);\n"
           "  dK.mul_(sc);\n",
           ("tests/test_fuzz.py", "tests/test_tolerance.py", "-k", "cuda"),
           "tiled sim_lse backward (CUDA): dQ scaled by 1.5 for fp16/bf16 inputs only", gpu_only=True),
    Mutant("tiling-sim-lse-col-range-off-by-one", "csrc/tiling.h",
           "      const int64_t bc = std::min(BC, hi - c0);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           "      const int64_t bc = std::min(BC, hi - c0 - 1);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           ("tests/test_cext.py", "tests/test_info_nce.py", "-k", "cuda"),
           "tiled sim_lse forward (CUDA): column range one short per column block", gpu_only=True),
    Mutant("cuda-col-lse-term-dropped", "csrc/cuda/epilogues.cu",
           "      if (has_col) d += gc[gj] * dexp(s - cl[gj]);\n", "",
           ("tests/test_cext.py", "tests/test_info_nce.py", "-k", "cuda"),
           "CUDA backward epilogue drops the column-LSE term"),
    Mutant("cuda-dscale-sign", "csrc/cuda/epilogues.cu",
           "  if (threadIdx.x == 0) atomicAdd(dscale, acc);\n", "  if (threadIdx.x == 0) atomicAdd(dscale, -acc);\n",
           ("tests/test_cext.py", "tests/test_info_nce.py", "-k", "cuda"),
           "CUDA backward: the scale gradient with its sign swapped"),
)
