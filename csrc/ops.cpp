// Operator schemas of contrastive_ops._C, declared once.  Device kernels are
// registered with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*;
// fake (meta) kernels for torch.compile live in Python
// (contrastive_ops/backends/_cext.py).  Further ops can be added from other
// files with TORCH_LIBRARY_FRAGMENT(contrastive_ops, m).
//
// The maths of sim_lse_* is the docstring of contrastive_ops/core.py, that of
// siglip_* is contrastive_ops.losses.siglip.siglip_sum_reference.
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
  m.def(
      "sim_lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, bool want_col) -> (Tensor, Tensor)");
  // (dq like q, dk like k, dscale 0-dim like scale).  When q and k are one
  // tensor (the same TensorImpl, as autograd passes an input used twice) only
  // dq + dk is meaningful: the CPU kernel may then return all of it in dq and
  // zeros in dk (symmetric Gram, see csrc/cpu/sim_lse.cpp).
  m.def(
      "sim_lse_bwd(Tensor q, Tensor k, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "Tensor? col_start, Tensor? col_end, Tensor? exclude, Tensor row_lse, Tensor col_lse, "
      "Tensor grad_row, Tensor grad_col) -> (Tensor, Tensor, Tensor)");
  // 0-dim sum of softplus(-z_ij (scale x_i.y_j + bias)), z = 2I - 1.
  m.def("siglip_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias) -> Tensor");
  // (dx like x, dy like y, dscale like scale, dbias like bias).
  m.def("siglip_bwd(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
