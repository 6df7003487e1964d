// Rows split into one chunk per thread, for the CPU kernels whose per-chunk partials are
// reduced in chunk order afterwards (bitwise reproducible for a fixed thread count).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace contrastive_ops {

struct RowChunks {
  int64_t B, P;  // P = min(B, threads) chunks (at least 1); each holds at least one row when B >= 1

  explicit RowChunks(int64_t rows)
      : B(rows), P(std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()))) {}

  // f(p, r0, r1) for each chunk p = rows [B·p/P, B·(p+1)/P), the chunks in parallel.
  template <class F>
  void run(const F& f) const {
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) f(p, B * p / P, B * (p + 1) / P);
    });
  }

  // Σ over the chunks of f(r0, r1) (a double), the partials added in chunk order.
  template <class F>
  double sum(const F& f) const {
    std::vector<double> part(P, 0.0);
    run([&](int64_t p, int64_t r0, int64_t r1) { part[p] = f(r0, r1); });
    double total = 0;
    for (const double v : part) total += v;
    return total;
  }
};

}  // namespace contrastive_ops
