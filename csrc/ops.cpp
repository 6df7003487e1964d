// Operator schemas of contrastive_ops._C: every op is declared here, once.
// Device kernels are registered with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and
// csrc/cuda/*; fake (meta) kernels and autograd formulas for torch.compile
// live in Python (contrastive_ops/backends/_cext.py).
//
// The maths of each op is the contract of its primitive in
// contrastive_ops/primitives/: sim_lse_* in sim_lse.py, siglip_* in
// siglip_pairs.py, sinkhorn* in sinkhorn.py, swav_ce_* in swav_ce.py, sim_expect_* in
// sim_expect.py, pix_pos_* in pix_pos.py, gated_lse_* in gated_lse.py,
// label_lse_* in label_lse.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing contrastive_ops._C runs the static registrations below; the module
// itself has no Python-level functions (ops are reached via torch.ops).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "contrastive_ops custom operators (see torch.ops.contrastive_ops)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(contrastive_ops, m) {
  // row_lse (B,), col_lse (M,) or (0,) without want_col; fp32 (float64 for float64 inputs).
  // row_max (B,) fp32/float64 or None: pair (i, j) also needs !(S[i, j] > row_max[i]) (forward and
  // backward compare the same S; see contrastive_ops/primitives/sim_lse.py).
  m.def(
      "sim_lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, bool want_col, Tensor? row_max=None) -> (Tensor, Tensor)");
  // (dq like q, dk like k, dscale 0-dim like scale).  When q and k are one
  // tensor (the same TensorImpl, as autograd passes an input used twice) only
  // dq + dk is meaningful: the CPU kernel may then return all of it in dq and
  // zeros in dk (symmetric Gram, see csrc/cpu/sim_lse.cpp).
  m.def(
      "sim_lse_bwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, Tensor row_lse, Tensor col_lse, "
      "Tensor grad_row, Tensor grad_col, Tensor? row_max=None) -> (Tensor, Tensor, Tensor)");
  // 0-dim sum of softplus(-z_ij (scale x_i.y_j + bias)), z = 2I - 1.
  m.def("siglip_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias) -> Tensor");
  // (dx like x, dy like y, dscale like scale, dbias like bias).
  m.def("siglip_bwd(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Sinkhorn-Knopp codes (B, K) fp32 after `iterations` log-domain steps.
  m.def("sinkhorn(Tensor scores, float epsilon, int iterations) -> Tensor");
  // (K,) LSE_b(S[b,k]/eps + u[b]), u[b] = -LSE_k(S[b,k]/eps + v[k]) (u = 0 without v).
  m.def("sinkhorn_col_lse(Tensor scores, float epsilon, Tensor? v) -> Tensor");
  // (B, K) fp32 exp(S/eps + v[k] - (LSE_k(S/eps + v) if normalize)).
  m.def("sinkhorn_codes(Tensor scores, float epsilon, Tensor v, bool normalize) -> Tensor");
  // Σ_b of the soft-target cross-entropy of scale·x against t: (0-dim, lse (B,)).
  m.def("swav_ce_fwd(Tensor x, Tensor t, Tensor scale) -> (Tensor, Tensor)");
  // (dx like x, dscale 0-dim) for the 0-dim gradient grad of the forward's loss.
  m.def("swav_ce_bwd(Tensor x, Tensor t, Tensor scale, Tensor lse, Tensor grad) -> (Tensor, Tensor)");
  // Row LSE of scale·q·kᵀ and the row's softmax-weighted mean of q·kᵀ (one excluded candidate per row at
  // most): (lse (B,), mean (B,)) in the accumulation dtype.  CPU kernels only (csrc/cpu/sim_expect.cpp).
  m.def("sim_expect_fwd(Tensor q, Tensor k, Tensor scale, Tensor? exclude) -> (Tensor, Tensor)");
  // (dq like q, dk like k, dscale 0-dim) for upstream gradients of lse and mean.
  m.def(
      "sim_expect_bwd(Tensor q, Tensor k, Tensor scale, Tensor? exclude, Tensor lse, Tensor mean, Tensor grad_lse, "
      "Tensor grad_mean) -> (Tensor, Tensor, Tensor)");
  // Row LSE of scale·q·kᵀ plus the label log-weight φ(coef_i·|y_row_i − y_col_j|) over a column range per row,
  // one excluded candidate per row at most (< 0: none) and, with skip_equal, the equal labels left out:
  // lse (B,) in the accumulation dtype.  kind: 0 L1_inv, 1 L2_inv, 2 L1, 3 L2.  Mixture mode (row_term given,
  // with row_ids (B,) and col_ids (M,) int32): λ_ij ~ Beta(beta_a, beta_b) from the counter-based generator
  // keyed by (seed, row_ids_i, col_ids_j), and each logit is λ·row_term_i + (1 − λ)·scale·q_i·k_j +
  // φ((1 − λ)·coef_i·|Δy|).  CPU kernels only (csrc/cpu/label_lse.cpp; maths in
  // contrastive_ops/primitives/label_lse.py).
  m.def(
      "label_lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor y_row, Tensor y_col, Tensor coef, Tensor col_start, "
      "Tensor col_end, Tensor exclude, int kind, bool skip_equal, Tensor? row_term, Tensor? row_ids, "
      "Tensor? col_ids, int seed, int beta_a, int beta_b) -> Tensor");
  // (dq like q, dk like k, dscale 0-dim, drow_term (B,)) for the upstream gradient grad of lse; labels and coef
  // get none; drow_term is 0 outside mixture mode.
  m.def(
      "label_lse_bwd(Tensor q, Tensor k, Tensor scale, Tensor y_row, Tensor y_col, Tensor coef, Tensor col_start, "
      "Tensor col_end, Tensor exclude, int kind, bool skip_equal, Tensor? row_term, Tensor? row_ids, "
      "Tensor? col_ids, int seed, int beta_a, int beta_b, Tensor lse, Tensor grad) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  // The mixture generator's uniforms u_draw of the pairs (rows_i, cols_j): (R, C) fp32 (a test hook).
  m.def("label_lse_uniforms(int seed, Tensor rows, Tensor cols, int draw) -> Tensor");
  // PixPro's masked pixel sum (Z (B, P, D), cnt (B, P)), positives from the per-axis bin-centre tables;
  // CPU only (primitives/pix_pos.py).
  m.def("pix_pos_sum(Tensor x, Tensor dxt, Tensor dyt, Tensor diag, Tensor ratio, int H, int W) -> (Tensor, Tensor)");
  // PixContrast's (lse_pos, lse_all) (B, P) and their backward (dq, dscale); CPU only (primitives/pix_pos.py).
  m.def(
      "pix_pos_lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor dxt, Tensor dyt, Tensor diag, Tensor ratio, "
      "int H, int W, bool batch_negatives, int offset) -> (Tensor, Tensor)");
  m.def(
      "pix_pos_lse_bwd(Tensor q, Tensor k, Tensor scale, Tensor dxt, Tensor dyt, Tensor diag, Tensor ratio, "
      "int H, int W, bool batch_negatives, int offset, Tensor lse_pos, Tensor lse_all, Tensor g_pos, "
      "Tensor g_all) -> (Tensor, Tensor)");

  // Hydra's filter gating: row LSE over [col_start_i, col_end_i) of s·(a_i·k_j)·max(w_i·(k_j⊙k_j), eps²)^(-1/2),
  // lse (B,) fp32 (float64 for float64 a); CPU only (csrc/cpu/gated_lse.cpp, primitives/gated_lse.py).
  m.def("gated_lse_fwd(Tensor a, Tensor w, Tensor k, Tensor scale, Tensor col_start, Tensor col_end) -> Tensor");
  // (da, dw in a's dtype, dk like k, dscale 0-dim) for the upstream gradient grad_lse of lse.
  m.def(
      "gated_lse_bwd(Tensor a, Tensor w, Tensor k, Tensor scale, Tensor col_start, Tensor col_end, Tensor lse, "
      "Tensor grad_lse) -> (Tensor, Tensor, Tensor, Tensor)");

  // Test hooks of the CPU kernels (csrc/cpu/sim_lse.cpp, csrc/cpu/sinkhorn.cpp):
  // the epilogue flags (1 shifted exponentials, 2 symmetric Gram, 4 dq holds
  // dq + dk) of the last sim_lse_fwd (backward=False) or sim_lse_bwd call, -1
  // before any; how many threads ran the parts of the last row-block kernel
  // call; 1 if the last sinkhorn call took the scaling form, 0 the log domain,
  // -1 before any.
  m.def("_cpu_last_path(bool backward) -> int");
  m.def("_cpu_last_threads() -> int");
  m.def("_cpu_sinkhorn_last_path() -> int");

  // Test ops of the CUDA host tiling instantiated on CPU (csrc/cpu/sim_lse_tiled.cpp):
  // sim_lse and SigLIP through tiling.h with tile_rows × tile_cols tiles, so that
  // every cross-tile merge of the CUDA backend's host code runs on CPU; and the
  // tile (rows, cols) the CUDA backend picks for a problem
  // (CONTRASTIVE_OPS_CUDA_TILE included).
  m.def(
      "_sim_lse_tiled_fwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, bool want_col, int tile_rows=3, int tile_cols=5, "
      "Tensor? row_max=None) -> (Tensor, Tensor)");
  m.def(
      "_sim_lse_tiled_bwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, Tensor row_lse, Tensor col_lse, "
      "Tensor grad_row, Tensor grad_col, int tile_rows=3, int tile_cols=5, Tensor? row_max=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("_siglip_tiled_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias, int tile_rows=3, int tile_cols=5) -> Tensor");
  m.def(
      "_siglip_tiled_bwd(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor grad, int tile_rows=3, "
      "int tile_cols=5) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_cuda_tile_shape(int B, int M, int D) -> int[]");
}
