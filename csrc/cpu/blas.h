// Single-threaded GEMMs on raw row-major buffers for the CPU kernels.
//
// The CPU kernels parallelize over row blocks themselves (one task per
// thread, no barrier per tile), so each GEMM must run on the calling thread
// alone.  The Fortran BLAS symbols sgemm_/dgemm_ that libtorch_cpu exports
// (MKL or OpenBLAS) are called directly: inside an OpenMP parallel region MKL
// is told how many threads to use (BlasThreads: one, normally), and there is
// no tensor or dispatcher overhead per tile.
// Where the symbols are missing (weak references resolved to null) the GEMMs
// fall back to at::mm_out on from_blob views, which also runs on the calling
// thread inside a parallel region.
//
// All matrices are row-major; BLAS is column-major, so a row-major X is a
// column-major Xᵀ and every call below is the transposed product.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's C interface (mkl_set_num_threads_local is a macro for it).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace contrastive_ops {
namespace blas {

// Sets the number of BLAS threads of the calling thread while alive (1 in
// the usual case of one part per thread).  MKL would otherwise open a nested
// team of all its threads inside each part's thread (measured 10x slower on 2
// loaded cores); n > 1 lets parts use the threads left over when there are
// fewer parts than threads.  0 restores the global setting.
struct BlasThreads {
  int prev = 0;
  explicit BlasThreads(int64_t n) {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(int(std::max<int64_t>(n, 1)));
  }
  ~BlasThreads() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  }
};

inline bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                         const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ == nullptr) return false;
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
  return true;
}

inline bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                         int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ == nullptr) return false;
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
  return true;
}

template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// C (m × n, ld n) = A (m × k) · Bᵀ, B (n × k); A and B with leading dimension k.
template <typename T>
void nt(T* c, const T* a, const T* b, int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0) return;
  if (fortran_gemm('T', 'N', n, m, k, T(1), b, k, a, k, T(0), c, n)) return;
  at::Tensor out = view(c, m, n, n);
  at::mm_out(out, view(a, m, k, k), view(b, n, k, k).t());
}

// C (m × k, ld k) += A (m × n, ld lda) · B (n × k, ld k).
template <typename T>
void acc_nn(T* c, const T* a, int64_t lda, const T* b, int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0) return;
  if (fortran_gemm('N', 'N', k, m, n, T(1), b, k, a, lda, T(1), c, k)) return;
  view(c, m, k, k).addmm_(view(a, m, n, lda), view(b, n, k, k));
}

// C (n × k, ld k) += Aᵀ · B with A (m × n, ld lda), B (m × k, ld k).
template <typename T>
void acc_tn(T* c, const T* a, int64_t lda, const T* b, int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0) return;
  if (fortran_gemm('N', 'T', k, n, m, T(1), b, k, a, lda, T(1), c, k)) return;
  view(c, n, k, k).addmm_(view(a, m, n, lda).t(), view(b, m, k, k));
}

}  // namespace blas
}  // namespace contrastive_ops
