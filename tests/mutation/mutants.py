"""Deliberate kernel bugs (and a few in the Python compositions) that the test suite must catch.

Each mutant is (id, file, exact old snippet, new snippet, tests to run, what
it breaks).  The old snippet must occur exactly once in the file; when the
file has changed so that it no longer does, the runner reports the mutant as
``stale`` (to be rewritten), never as killed.

``csrc/cpu/*`` and ``csrc/tiling.h`` mutants need a CPU rebuild of the copy.
The CUDA host tiling of ``csrc/tiling.h`` and the per-element maths of
``csrc/cuda/tile_math.cuh`` / ``lse_math.cuh`` are also compiled into the CPU
instantiation (``csrc/cpu/sim_lse_tiled.cpp``), so their mutants are rebuilt
CPU-only and killed by ``tests/test_cuda_tiling.py``.  Other ``csrc/cuda/*``
mutants and those marked ``gpu_only`` reach only the CUDA kernels and are
reported ``needs a GPU`` on a machine without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


# CUDA sources that the CPU build compiles too (through csrc/cpu/sim_lse_tiled.cpp).
CPU_BUILT_CUDA_FILES = ("csrc/cuda/tile_math.cuh", "csrc/cuda/lse_math.cuh")


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
        if self.file in CPU_BUILT_CUDA_FILES and not self.gpu_only:
            return "cpp"
        if self.file.startswith("csrc/cuda/") or self.gpu_only:
            return "cuda"
        if self.file.startswith("csrc/"):
            return "cpp"
        return "python"


_SWAV = ("tests/test_swav.py", "-k", "triton")
_CORE = ("tests/test_info_nce.py", "tests/test_tolerance.py", "-k", "triton")
_FUZZ_TRITON = ("tests/test_fuzz.py", "-k", "triton")
_TILED = ("tests/test_cuda_tiling.py",)
_SHAPING = ("tests/test_negative_shaping.py",)
_MARGIN = ("tests/test_false_negative_margin.py",)
_GATED = ("tests/test_hydra.py", "-k", "gated or filter")
_GATED_CPU = ("tests/test_hydra.py", "-k", "cpu")
_LABEL = ("tests/test_label_lse.py",)
_WEIGHTED = ("tests/test_supremix.py", "-k", "weighted")
_RING_MEMORY = ("tests/test_ring.py", "-k", "never_holds")
_MIX = ("tests/test_label_lse.py", "-k", "mixture or generator or draw")
_DRAWN = ("tests/test_supremix.py", "-k", "drawn or default")

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
    Mutant("triton-sim-lse-col-mask-edge", "contrastive_ops/backends/_triton/tiles.py",
           "    col_mask = cols < M\n", "    col_mask = cols < M - 1\n", _CORE,
           "sim_lse column tile mask (shared by the forward and backward kernels) drops the last column"),
    Mutant("triton-sim-lse-col-lse-dropped", "contrastive_ops/backends/_triton/sim_lse.py",
           "    return torch.logsumexp(torch.where(ref == float(\"inf\"), col_part, ref + torch.log(col_part)), 0)\n",
           "    return torch.where(ref == float(\"inf\"), col_part, ref + torch.log(col_part))[0]\n", _CORE,
           "sim_lse column LSE keeps the first row tile's partial only (dropped terms)"),
    Mutant("triton-fwd-shared-max-no-fallback", "contrastive_ops/backends/_triton/tiles.py",
           "    if tl.max((col_ok & ~(c_val >= SHARED_MAX_FLOOR)).to(tl.int32), 0) > 0:\n",
           "    if tl.max((col_ok & ~(c_val >= SHARED_MAX_FLOOR)).to(tl.int32), 0) > 1000000:\n",
           ("tests/test_triton_minwork.py", "-k", "column_partials"),
           "general forward: columns far below the tile's maximum never take their own (exp(S − T) underflows)"),
    Mutant("triton-fwd-fallback-ref-not-flagged", "contrastive_ops/backends/_triton/tiles.py",
           "        c_ref = float(\"inf\")\n", "        c_ref = 0.0\n",
           ("tests/test_triton_minwork.py", "-k", "column_partials"),
           "general forward: the fallback's column LSEs are merged as if they were sums (log taken twice)"),
    Mutant("triton-fwd-plain-rows-past-b", "contrastive_ops/backends/_triton/tiles.py",
           "    t_col = tl.where(row_ok, t, float(\"-inf\"))\n", "    t_col = t\n",
           ("tests/test_triton_minwork.py", "-k", "column_partials"),
           "general forward: the unmasked tiles count the zero rows past B in the column sums"),
    Mutant("triton-gemm-bwd-dscale-half", "contrastive_ops/backends/_triton/sim_lse.py",
           "        parts.append(torch.einsum(\"bd,bd->\", dsk, qc.float()))",
           "        parts.append(torch.einsum(\"bd,bd->\", dsk, qc.float()) * (0.5 if r0 == 0 else 1.0))",
           ("tests/test_triton_gemm_bwd.py",),
           "GEMM backward: dscale from the product takes half of the first row block"),
    Mutant("triton-sim-lse-bwd-col-term-dropped", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "        ds += g_c[None, :] * fexp(s - lse_c[None, :])\n", "        ds = ds + 0.0\n", _CORE,
           "sim_lse backward dS drops the column-LSE term"),
    Mutant("triton-siglip-dscale-sign", "contrastive_ops/backends/_triton/siglip.py",
           "        d_scale += tl.sum(g * xy, 1)\n", "        d_scale -= tl.sum(g * xy, 1)\n",
           ("tests/test_siglip.py", "tests/test_triton_kernels.py", "-k", "triton"),
           "SigLIP logit-scale gradient with its sign swapped"),
    Mutant("triton-chunked-g-shifted", "contrastive_ops/backends/_triton/tiles.py",
           "    return s_tile(Q, K, rows.to(tl.int64), cols.to(tl.int64), rmask, cmask,",
           "    return s_tile(Q, K, rows.to(tl.int64), (cols + 1).to(tl.int64), rmask, cmask,",
           ("tests/test_cacr.py", "tests/test_label_lse.py", "-k", "triton"),
           "sim_expect's and label_lse's chunked (fp32) G reads the next candidate's features"),
    Mutant("triton-pix-pos-dq-chunk-offset-dropped", "contrastive_ops/backends/_triton/pix_pos.py",
           "    m_ok = offs_m < P\n    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)\n    d_ok = offs_d < D\n    rows",
           "    m_ok = offs_m < P\n    offs_d = tl.arange(0, BLOCK_D)\n    d_ok = offs_d < D\n    rows",
           ("tests/test_pixcontrast.py", "-k", "triton"),
           "PixContrast LSE backward: every dQ chunk's program writes the first chunk"),
    Mutant("triton-pix-pos-qk-chunk-skips-last", "contrastive_ops/backends/_triton/pix_pos.py",
           "    for d0 in range(0, D, BLOCK_DS):\n        d_ok = d0 + offs < D\n",
           "    for d0 in range(0, D - BLOCK_DS, BLOCK_DS):\n        d_ok = d0 + offs < D\n",
           ("tests/test_pixcontrast.py", "-k", "triton"),
           "PixContrast S tiles leave out the last D chunk"),
    Mutant("triton-sinkhorn-mask-edge", "contrastive_ops/backends/_triton/sinkhorn.py",
           '        x = tl.where(cmask[None, :], x, float("-inf"))\n', "        x = tl.where(cmask[None, :], x, 0.0)\n",
           ("tests/test_swav.py", "-k", "triton and sinkhorn"),
           "Sinkhorn row LSE counts padded columns as exp(0)"),
    Mutant("triton-gemm-bwd-ds-mask-edge", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "ds.to(DS.dtype.element_ty),\n             mask=row_mask[:, None] & col_mask[None, :])",
           "ds.to(DS.dtype.element_ty),\n             mask=row_mask[:, None] & (cols < M - 1)[None, :])",
           ("tests/test_triton_gemm_bwd.py",),
           "GEMM backward: the dS store misses the last column (a tile edge)"),
    Mutant("triton-gemm-bwd-siglip-dscale-sign", "contrastive_ops/backends/_triton/siglip.py",
           "    tl.store(ScalePart + part, tl.sum(s_rows, 0))",
           "    tl.store(ScalePart + part, -tl.sum(s_rows, 0))",
           ("tests/test_triton_gemm_bwd.py",),
           "SigLIP GEMM backward: logit-scale gradient with its sign swapped"),
    Mutant("triton-gemm-gram-transposed-terms", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "    val = tl.where(first, _gram_pick(ds, ds_t, TERMS), _gram_pick(ds_t, ds, TERMS))",
           "    val = tl.where(first, _gram_pick(ds, ds_t, TERMS), _gram_pick(ds, ds_t, TERMS))",
           ("tests/test_triton_gemm_bwd.py", "-k", "gram"),
           "Gram GEMM backward: tiles below the diagonal store dS and dSᵀ swapped (wrong for dq and dk apart)"),
    Mutant("triton-gemm-gram-dscale-view", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "    own = tl.where(first, ds, ds_t)", "    own = ds",
           ("tests/test_triton_gemm_bwd.py", "-k", "gram"),
           "Gram GEMM backward: the scale gradient sums the lower row's view below the diagonal"),
    Mutant("triton-gemm-gram-scalar-stores", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "    tl.store(G + (rows_i - R0).to(tl.int64)[:, None] * stride_g + cols_j[None, :], out.to(G.dtype.element_ty),",
           "    tl.store(G + tl.where(first, (rows_i - R0).to(tl.int64)[:, None] * stride_g + cols_j[None, :],\n"
           "                          (cols_j - R0).to(tl.int64)[None, :] * stride_g + rows_i[:, None]),\n"
           "             out.to(G.dtype.element_ty),",
           ("tests/test_triton_compile.py", "-k", "gram_ds"),
           "Gram G kernel: the tile's address chosen by where (as first written): scalar 2-byte stores"),
    Mutant("triton-siglip-fused-loss-unmasked", "contrastive_ops/backends/_triton/siglip.py",
           "    l_rows = tl.sum(tl.where(ok, tl.maximum(t, 0.0) + log1p, 0.0), 1)",
           "    l_rows = tl.sum(tl.maximum(t, 0.0) + log1p, 1)",
           ("tests/test_triton_gemm_bwd.py", "-k", "one_pass"),
           "SigLIP's one-pass step: the loss counts the padded pairs of edge tiles"),
    Mutant("triton-gemm-fp32-split-drops-mm", "contrastive_ops/backends/_triton/products.py",
           "        acc += mm(am, bm)\n", "",
           ("tests/test_triton_gemm_bwd.py", "-k", "bf16x6"),
           "fp32 GEMM products: one of the 2^-16 bf16 products of the split left out"),
    Mutant("triton-gemm-fp32-split-two-terms", "contrastive_ops/backends/_triton/products.py",
           "    return h, m, (r - m.float()).to(torch.bfloat16)", "    return h, m, torch.zeros_like(m)",
           ("tests/test_triton_gemm_bwd.py", "-k", "bf16x3 or bf16x6"),
           "fp32 GEMM products: the split keeps two bf16 terms (16 bits) instead of three"),
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
    Mutant("cpu-col-lse-term-dropped", "csrc/cpu/lse_epilogue.h",
           "        const T d = s > thr ? T(0) : gr * fast_exp(s - rl) + gc[j + l] * fast_exp(s - cl[j + l]);\n",
           "        const T d = s > thr ? T(0) : gr * fast_exp(s - rl);\n",
           ("tests/test_cext.py", "tests/test_cext_cpu_paths.py", "tests/test_info_nce.py", "-k", "cpu"),
           "CPU backward epilogue drops the column-LSE term (vector lanes)"),
    Mutant("cpu-swav-tail-off-by-one", "csrc/cpu/swav_ce.cpp",
           "  for (; k < K; ++k) {\n    const T p = fastmath::fast_exp(s * x[k] - lse);\n",
           "  for (; k + 1 < K; ++k) {\n    const T p = fastmath::fast_exp(s * x[k] - lse);\n",
           ("tests/test_swav.py", "-k", "cpu"),
           "CPU SwAV CE backward skips the last column of a row's scalar tail"),
    # ------------------------------------------------------------------ CUDA tiling, run on CPU
    # csrc/tiling.h's sim_lse loops and csrc/cuda/tile_math.cuh / lse_math.cuh are compiled into the CPU
    # instantiation (csrc/cpu/sim_lse_tiled.cpp): tests/test_cuda_tiling.py kills these mutants on CPU.
    Mutant("tiling-sim-lse-dq-x1.5-half", "csrc/tiling.h",
           "  dQ.mul_(f);\n  dK.mul_(f);\n",
           "  dQ.mul_(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ? f : f * 1.5);\n"
           "  dK.mul_(f);\n",
           _TILED, "tiled sim_lse backward (CUDA and its CPU instantiation): dQ scaled by 1.5 for fp16/bf16 only"),
    Mutant("tiling-sim-lse-col-range-off-by-one", "csrc/tiling.h",
           "      const int64_t bc = std::min(BC, hi - c0);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           "      const int64_t bc = std::min(BC, hi - c0 - 1);\n      Tensor G = tile_view(gbuf, br, bc);\n",
           _TILED, "tiled sim_lse forward (CUDA and its CPU instantiation): column range one short per column block"),
    Mutant("tile-math-col-lse-term-dropped", "csrc/cuda/tile_math.cuh",
           "  if (has_col) d += gc * fexp(s - cl);\n", "",
           _TILED, "tile epilogue dS (CUDA kernels and the CPU instantiation): the column-LSE term dropped"),
    Mutant("tile-math-chunk-max-drops-nan", "csrc/cuda/tile_math.cuh",
           "  for (int i = 0; i < n; ++i) m = nan_max(m, v[i * stride]);\n",
           "  for (int i = 0; i < n; ++i) m = v[i * stride] > m ? v[i * stride] : m;\n",
           _TILED, "tile epilogue maxima (CUDA kernels and the CPU instantiation) let a NaN logit lose to -inf"),
    Mutant("tile-math-chunk-sum-skips-first", "csrc/cuda/tile_math.cuh",
           "  for (int i = 0; i < n; ++i) s += fexp(v[i * stride] - m);\n",
           "  for (int i = 1; i < n; ++i) s += fexp(v[i * stride] - m);\n",
           _TILED, "tile epilogue sums of exponentials (CUDA kernels and the CPU instantiation) skip a chunk's first logit"),
    Mutant("tile-math-exclusion-misses-last-column", "csrc/cuda/tile_math.cuh",
           "    if (d < uint64_t(n)) bits &= ~(1u << d);\n", "    if (d + 1 < uint64_t(n)) bits &= ~(1u << d);\n",
           _TILED, "tile epilogue masks (CUDA kernels and the CPU instantiation): an exclusion in a thread's last "
           "column is ignored"),
    Mutant("tile-math-range-end-off-by-one", "csrc/cuda/tile_math.cuh",
           "  uint32_t bits = low_bits(hi) & ~low_bits(lo);\n", "  uint32_t bits = low_bits(hi + 1) & ~low_bits(lo);\n",
           _TILED, "tile epilogue masks (CUDA kernels and the CPU instantiation): a row's column range one column "
           "too long"),
    Mutant("lse-math-merge-drops-partial", "csrc/cuda/lse_math.cuh",
           "  s = s * dexp(m - mn) + s2 * dexp(m2 - mn);\n", "  s = s * dexp(m - mn);\n",
           _TILED, "online LSE merge of two partials (CUDA kernels and the CPU instantiation) drops the second sum"),
    # ------------------------------------------------------------------ CUDA only
    Mutant("cuda-dscale-sign", "csrc/cuda/epilogues.cu",
           "        acc += d[k] * g[k];\n", "        acc -= d[k] * g[k];\n",
           ("tests/test_cext.py", "tests/test_info_nce.py", "-k", "cuda"),
           "CUDA backward epilogue: the scale gradient's partials with their sign swapped"),
    Mutant("cuda-sum-parts-edge", "csrc/cuda/epilogues.cu",
           "  for (int64_t i = threadIdx.x; i < n; i += kThreads) a += part[i];\n",
           "  for (int64_t i = threadIdx.x; i < n - 1; i += kThreads) a += part[i];\n",
           ("tests/test_cext.py", "tests/test_info_nce.py", "tests/test_siglip.py", "-k", "cuda"),
           "CUDA sum of sub-block partials (dscale, SigLIP loss) drops the last partial"),
    # ------------------------------------------------------------------ negative shaping (Python compositions)
    Mutant("shaping-drop-beta-scale", "contrastive_ops/losses/info_nce.py",
           "scales = [(1.0 + beta) * scale]", "scales = [scale]",
           _SHAPING, "HCL info_nce: the hard-negative LSE taken at 1/tau instead of (1+beta)/tau"),
    Mutant("shaping-debias-sign", "contrastive_ops/losses/info_nce.py",
           "d = -torch.expm1(u)", "d = 2 + torch.expm1(u)",
           _SHAPING, "debiased composition adds tau+·M·p instead of subtracting it"),
    Mutant("shaping-reference-debias-sign", "contrastive_ops/losses/info_nce.py",
           "- tau_plus * M * p) / (1.0 - tau_plus)", "+ tau_plus * M * p) / (1.0 - tau_plus)",
           _SHAPING, "debiased reference adds tau+·M·p instead of subtracting it"),
    Mutant("shaping-positive-among-negatives", "contrastive_ops/losses/info_nce.py",
           "blocks = [(keys, torch.stack([self_pos, partner], 1))]", "blocks = [(keys, self_pos[:, None])]",
           _SHAPING, "HCL nt_xent: the positive left among the reweighted negatives"),
    # ------------------------------------------------------------------ false-negative filter (row_max)
    Mutant("triton-row-max-dk-dropped", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "    ok = under_row_max(ok, s_raw, scale, row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX), HAS_ROW_MAX)\n"
           "    lse_r, g_r = _row_stats(RowLse, GradRow, rows, row_mask)\n"
           "    ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)\n    if REUSE:",
           "    lse_r, g_r = _row_stats(RowLse, GradRow, rows, row_mask)\n"
           "    ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)\n    if REUSE:",
           _MARGIN + ("-k", "triton"), "Triton dk kernel ignores the row threshold (the forward applies it)"),
    Mutant("triton-gram-row-max-t-dropped", "contrastive_ops/backends/_triton/sim_lse_bwd.py",
           "            under_row_max_t(ok_t, s_raw, scale, rmax_c, HAS_ROW_MAX))", "            ok_t)",
           _MARGIN + ("-k", "triton"), "Triton Gram backwards: the columns' view ignores its rows' thresholds"),
    Mutant("cpu-row-max-bwd-dropped", "csrc/cpu/lse_epilogue.h",
           "        const T x = g[j + l], d = capped_exp(scale * x, R, thr) * a;\n",
           "        const T x = g[j + l], d = fast_exp(scale * x - R) * a;\n",
           _MARGIN + ("-k", "cpu"), "CPU backward (shifted epilogue, vector lanes) ignores the row threshold"),
    Mutant("cpu-nan-alone-among-masked", "csrc/cpu/sim_lse.cpp",
           "            if (m == neg_inf<T>()) m = nan_among(gp + l, h - l);  // a NaN logit alone among masked ones\n",
           "", ("tests/test_cext.py", "-k", "nan and cpu"),
           "CPU sim_lse forward: a NaN logit whose row allows nothing else gives the row an LSE of -inf"),
    Mutant("tiled-row-max-bwd-dropped", "csrc/cpu/sim_lse_tiled.cpp",
           "if (ok != 0 && under_threshold(s, row_threshold<T>(mk, gi))) {",
           "if (ok != 0) {",
           _MARGIN + ("-k", "tiling"), "CUDA tiling on CPU: the backward epilogue ignores the row threshold"),
    Mutant("cuda-row-max-bwd-dropped", "csrc/cuda/epilogues.cu",
           "(((ok >> k) & 1u) != 0 && under_threshold(s, thr));", "(((ok >> k) & 1u) != 0);",
           _MARGIN + ("-k", "cuda"), "CUDA backward epilogue ignores the row threshold"),
    Mutant("margin-sign", "contrastive_ops/losses/info_nce.py",
           "    return cos_pos.detach() + margin\n", "    return cos_pos.detach() - margin\n",
           _MARGIN, "false-negative filter: threshold cos_pos - m instead of cos_pos + m"),
    Mutant("margin-count-all-negatives", "contrastive_ops/losses/info_nce.py",
           "    if cut is not None:\n        n_neg = _kept_count(q, blocks, cut, backend)\n", "",
           _MARGIN, "shaped info_nce with the filter: M_i counts the dropped negatives too"),
    # ------------------------------------------------------------------ gated_lse (hydra filter gating)
    Mutant("gated-lse-norm-gate-dropped-at-tile-edge", "contrastive_ops/backends/_triton/gated_lse.py",
           "        ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])\n"
           "        z = tl.where(ok, z, float(\"-inf\"))\n",
           "        ok = (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])\n"
           "        z = tl.where(cols[None, :] % BLOCK_N == BLOCK_N - 1,\n"
           "                     g * tl.rsqrt(tl.maximum(tl.sum(k * k, 1), 1e-24))[None, :] * s, z)\n"
           "        z = tl.where(ok, z, float(\"-inf\"))\n",
           _GATED, "gated_lse forward: the last column of each tile normalized by the ungated key norm"),
    Mutant("gated-lse-dk-norm-term-halved", "contrastive_ops/backends/_triton/gated_lse.py",
           "        acc += 2.0 * _tile(K, cols, cmask, offs_d, D, stride_k) * tl.load(tmp, mask=out, other=0.0)\n",
           "        acc += _tile(K, cols, cmask, offs_d, D, stride_k) * tl.load(tmp, mask=out, other=0.0)\n",
           _GATED, "gated_lse dk: the key-norm term's factor 2 of d(k²)/dk dropped"),
    Mutant("gated-lse-dw-dropped", "contrastive_ops/backends/_triton/gated_lse.py",
           "            acc = tl.dot(dn, k * k, acc, input_precision=PREC)\n",
           "            acc = tl.dot(dn, k * k, acc * 0.0, input_precision=PREC)\n",
           _GATED, "gated_lse backward: each column tile overwrites the squared gate's accumulated gradient"),
    Mutant("gated-lse-dk-skips-touching-row-block", "contrastive_ops/backends/_triton/gated_lse.py",
           "tl.max(ce, 0) > c0):", "tl.max(ce, 0) > c0 + 1):",
           _GATED, "gated_lse dk: a row block whose ranges end one column into the block is skipped"),
    Mutant("cpu-gated-lse-fwd-tile-edge-off-by-one", "csrc/cpu/gated_lse.cpp",
           "const int64_t j1 = std::min<int64_t>(c0 + nc, o.ce[row]) - c0;",
           "const int64_t j1 = std::min<int64_t>(c0 + nc - 1, o.ce[row]) - c0;",
           _GATED_CPU, "CPU gated_lse forward: the last column of each tile left out of every row's LSE"),
    Mutant("cpu-gated-lse-bwd-tile-edge-off-by-one", "csrc/cpu/gated_lse.cpp",
           "j1 = std::min<int64_t>(c0 + nc, ce[row]) - c0;", "j1 = std::min<int64_t>(c0 + nc - 1, ce[row]) - c0;",
           _GATED_CPU, "CPU gated_lse backward: the last column of each tile gets no gradient"),
    Mutant("cpu-gated-lse-dn-factor", "csrc/cpu/gated_lse.cpp",
           "T(-0.5) * ds * z / nj", "T(-1) * ds * z / nj",
           _GATED_CPU, "CPU gated_lse backward: dN = -dS·S/N (the factor 1/2 of d(N^-1/2) dropped)"),
    Mutant("cpu-gated-lse-dk-norm-term-halved", "csrc/cpu/gated_lse.cpp",
           "dkg[x] += T(2) * kc[x] * dn[x];", "dkg[x] += kc[x] * dn[x];",
           _GATED_CPU, "CPU gated_lse dk: the key-norm term's factor 2 of d(k²)/dk dropped"),
    Mutant("cpu-gated-lse-dk-skips-touching-row-block", "csrc/cpu/gated_lse.cpp",
           "o.hi[b] > c0)) continue;", "o.hi[b] > c0 + 1)) continue;",
           _GATED_CPU, "CPU gated_lse dk: a row block whose ranges end one column into the column block is skipped"),
    # ------------------------------------------------------------------ label_lse (SupReMix weights)
    Mutant("triton-label-lse-weight-sign", "contrastive_ops/backends/_triton/label_lse.py",
           "    w = tl.where(kind >= 2, -w, w)\n", "    w = tl.where(kind >= 2, w, -w)\n",
           _LABEL + ("-k", "triton"), "Triton label_lse: the log-weight's sign swapped (w and 1/w)"),
    Mutant("triton-label-lse-coef-ignored", "contrastive_ops/backends/_triton/label_lse.py",
           "    d = c[:, None] * tl.abs(yr[:, None] - yc[None, :])\n",
           "    d = tl.abs(yr[:, None] - yc[None, :]) + 0.0 * c[:, None]\n",
           _LABEL + ("-k", "triton"), "Triton label_lse: the row coefficient c_i (1 - lambda_i) ignored"),
    Mutant("triton-label-lse-dk-tile-edge", "contrastive_ops/backends/_triton/label_lse.py",
           "    cmask = cols < M\n    offs_d = tl.arange(0, BLOCK_D)\n"
           "    k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)\n"
           "    yc = tl.load(YC + cols, mask=cmask, other=0.0)\n    s = tl.load(Scale)\n",
           "    cmask = (cols < M) & (cols % BLOCK_N != BLOCK_N - 1)\n    offs_d = tl.arange(0, BLOCK_D)\n"
           "    k = held_tile(K, cols.to(tl.int64), cmask, offs_d, D, stride_k, UPCAST, BLOCK_DS == BLOCK_D)\n"
           "    yc = tl.load(YC + cols, mask=cmask, other=0.0)\n    s = tl.load(Scale)\n",
           _LABEL + ("-k", "triton"), "Triton label_lse dk: the last column of each tile gets no gradient"),
    Mutant("triton-label-lse-skip-equal-ignored", "contrastive_ops/backends/_triton/label_lse.py",
           "    ok = ok & ((skip == 0) | (yr[:, None] != yc[None, :]))\n", "",
           _LABEL + ("-k", "triton"), "Triton label_lse: equal labels not skipped"),
    Mutant("cpu-label-lse-weight-sign", "csrc/cpu/label_lse.cpp",
           "  if (o.kind >= 2) w = -w;\n", "  if (o.kind < 2) w = -w;\n",
           _LABEL + ("-k", "cpu"), "CPU label_lse: the log-weight's sign swapped (w and 1/w)"),
    Mutant("cpu-label-lse-coef-ignored", "csrc/cpu/label_lse.cpp",
           "  at::Tensor d = (yr - yc).abs() * o.coef.slice(0, r0, r1).unsqueeze(1);\n",
           "  at::Tensor d = (yr - yc).abs();\n",
           _LABEL + ("-k", "cpu"), "CPU label_lse: the row coefficient c_i (1 - lambda_i) ignored"),
    Mutant("cpu-label-lse-dk-block-edge", "csrc/cpu/label_lse.cpp",
           "      const int64_t c0 = b * kBlock, c1 = std::min(M, c0 + kBlock);\n      at::Tensor lam;\n",
           "      const int64_t c0 = b * kBlock, c1 = std::min(M, c0 + kBlock - 1);\n      dk.slice(0, c1, std::min(M, c0 + kBlock)).zero_();\n      at::Tensor lam;\n",
           _LABEL + ("-k", "cpu"), "CPU label_lse dk: the last candidate of each 64-column block gets no gradient"),
    # ------------------------------------------------------------------ label_lse mixture mode (λ per pair)
    Mutant("triton-label-lse-mix-draw-index", "contrastive_ops/backends/_triton/label_lse.py",
           "        gb += -tl.log(_uniform(key, BETA_A + t))\n", "        gb += -tl.log(_uniform(key, BETA_A + t + 1))\n",
           _MIX + ("-k", "triton"), "Triton label_lse: the Gamma(b) part of lambda drawn with shifted draw indices"),
    Mutant("triton-label-lse-mix-bwd-lambda-other-draw", "contrastive_ops/backends/_triton/label_lse.py",
           "        p = _probs(z, lse)\n        if MIX:\n            p = p * (1.0 - lam)\n",
           "        p = _probs(z, lse)\n        if MIX:\n            p = p * (1.0 - _mix_lambda(SeedP + 0, RID, CID, rows, rmask, cols, cmask, BETA_A + 1, BETA_B - 1))\n",
           _MIX + ("-k", "triton"), "Triton label_lse dk: the (1 - lambda) factor from another draw (Beta(a+1, b-1))"),
    Mutant("triton-label-lse-mix-db-missing", "contrastive_ops/backends/_triton/label_lse.py",
           "            pl += tl.sum(p * lam, 1)\n", "",
           _MIX + ("-k", "triton"), "Triton label_lse: the row term's gradient db missing (0)"),
    Mutant("triton-label-lse-mix-dq-no-one-minus-lambda", "contrastive_ops/backends/_triton/label_lse.py",
           "            p = p * (1.0 - lam)  # the G part of each logit carries (1 − λ)\n", "",
           _MIX + ("-k", "triton"), "Triton label_lse dq/dscale: the (1 - lambda) factor of the G part dropped"),
    Mutant("triton-label-lse-mix-weight-without-lambda", "contrastive_ops/backends/_triton/label_lse.py",
           "    if MIX:\n        d = d * (1.0 - lam)\n", "",
           _MIX + ("-k", "triton"), "Triton label_lse: the mixture's label distance not scaled by (1 - lambda)"),
    Mutant("cpu-label-lse-mix-draw-index", "csrc/cpu/label_lse.cpp",
           "gb += -std::log(static_cast<T>(pair_uniform(key, static_cast<uint32_t>(a + t))));",
           "gb += -std::log(static_cast<T>(pair_uniform(key, static_cast<uint32_t>(a + t + 1))));",
           _MIX + ("-k", "cpu"), "CPU label_lse: the Gamma(b) part of lambda drawn with shifted draw indices"),
    Mutant("cpu-label-lse-mix-bwd-lambda-other-draw", "csrc/cpu/label_lse.cpp",
           "      if (o.mix) P = P * (1 - lam);\n",
           "      if (o.mix) {\n        Operands o2 = o;\n        o2.seed += 1;\n        P = P * (1 - tile_lambda(o2, 0, B, c0, c1));\n      }\n",
           _MIX + ("-k", "cpu"), "CPU label_lse dk: the (1 - lambda) factor from another seed's draw"),
    Mutant("cpu-label-lse-mix-db-missing", "csrc/cpu/label_lse.cpp",
           "        db.slice(0, r0, r1).copy_(g * (P * lam).sum(1));\n", "        db.slice(0, r0, r1).zero_();\n",
           _MIX + ("-k", "cpu"), "CPU label_lse: the row term's gradient db missing (0)"),
    Mutant("supremix-drawn-lambda-local-rows", "contrastive_ops/losses/supremix.py",
           "row_term=self_d, seed=seed, beta=(int(beta[0]), int(beta[1])), row_ids=a,",
           "row_term=self_d, seed=seed, beta=(int(beta[0]), int(beta[1])), row_ids=torch.arange(a.numel()).flip(0),",
           _DRAWN, "SupReMix per-pair lambda keyed by other row counters than the reference's (global anchor index)"),
    Mutant("supremix-drawn-lambda-unsorted-cols", "contrastive_ops/losses/supremix.py",
           "row_ids=a,\n                        col_ids=perm, backend=backend)",
           "row_ids=a,\n                        col_ids=None, backend=backend)",
           _DRAWN, "SupReMix per-pair lambda keyed by the label-sorted column positions, not the sample indices"),
    Mutant("supremix-weighted-neg-coef-one", "contrastive_ops/losses/supremix.py",
           "coef=(1 - lam).expand(ya.shape), skip_equal=True", "coef=torch.ones_like(ya, dtype=lam.dtype), skip_equal=True",
           _WEIGHTED, "SupReMix hard negatives weighted by w(|y_i - y_k|), not the mixture's w((1-lambda_i)|y_i - y_k|)"),
    # ------------------------------------------------------------------ ring exchange
    Mutant("ring-keeps-visited-blocks", "contrastive_ops/primitives/ring.py",
           "            ring_wait(reqs)\n            cur = nbufs",
           "            ring_wait(reqs)\n            cands._kept = getattr(cands, '_kept', []) + [cur]\n            cur = nbufs",
           _RING_MEMORY, "ring: every visited candidate block kept alive (the global batch held piece by piece)"),
)
