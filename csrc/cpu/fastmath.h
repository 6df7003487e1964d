// Branch-free exp / log1p / softplus / sigmoid for the CPU epilogues, written
// so that GCC and Clang vectorize the loops that call them (std::exp does not
// vectorize without -ffast-math, which would also break the -inf handling the
// masks rely on).  float only; the float64 path calls the std:: functions.
//
// fast_exp: Cephes expf (range reduction by ln2 with a two-part constant and a
// degree-6 polynomial; relative error ~1e-7 over the whole range), returning 0
// below -87 (so exp(-inf) == 0) and saturating at exp(88.7).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// Multi-versioned hot loops: one clone per ISA, picked at load time, so the
// wheel stays portable while the loops run with the machine's widest vectors.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define CO_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CO_MULTIVERSION
#endif

// The loop bodies are templates called from the multiversioned functions: they
// must be inlined into each clone to be compiled for its ISA (an outlined copy
// is compiled once, for the baseline, and the clones would only jump to it).
#if defined(__GNUC__)
#define CO_INLINE inline __attribute__((always_inline))
#else
#define CO_INLINE inline
#endif

namespace contrastive_ops {
namespace fastmath {

CO_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
CO_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// e^x for x already within [-87.3, 88.7] (the body of fast_exp, without its clamps).
CO_INLINE float exp_in_range(float x) {
  // n = round(x / ln2) with the 1.5·2^23 trick (no floor instruction needed).
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const int32_t n = float_to_bits(t) - 0x4B400000;
  const float fn = t - magic;
  const float r = x - fn * 0.693359375f - fn * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * bits_to_float((n + 127) << 23);
}

CO_INLINE float fast_exp(float x) {
  const float lo = -87.0f, hi = 88.7f;
  const bool under = x < lo;
  const float y = exp_in_range(x < lo ? lo : (x > hi ? hi : x));
  return under ? 0.0f : y;
}

// log(1 + t) for t in [0, 1]: 2·atanh(w), w = t / (2 + t) <= 1/3, odd series to w^15.
CO_INLINE float log1p_unit(float t) {
  const float w = t / (2.0f + t), w2 = w * w;
  float p = 1.0f / 15.0f;
  p = p * w2 + 1.0f / 13.0f;
  p = p * w2 + 1.0f / 11.0f;
  p = p * w2 + 1.0f / 9.0f;
  p = p * w2 + 1.0f / 7.0f;
  p = p * w2 + 1.0f / 5.0f;
  p = p * w2 + 1.0f / 3.0f;
  p = p * w2 + 1.0f;
  return 2.0f * w * p;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)).
CO_INLINE float fast_softplus(float v) {
  const float a = v < 0.0f ? -v : v;
  return (v > 0.0f ? v : 0.0f) + log1p_unit(fast_exp(-a));
}

// σ(v) without overflow: e = exp(-|v|); σ = 1/(1+e) for v >= 0, e/(1+e) otherwise.
CO_INLINE float fast_sigmoid(float v) {
  const float a = v < 0.0f ? -v : v;
  const float e = fast_exp(-a);
  const float s = 1.0f / (1.0f + e);
  return v >= 0.0f ? s : e * s;
}

inline double fast_exp(double x) { return std::exp(x); }
inline double fast_softplus(double v) { return std::max(v, 0.0) + std::log1p(std::exp(-std::abs(v))); }
inline double fast_sigmoid(double v) {
  const double e = std::exp(-std::abs(v));
  return v >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

}  // namespace fastmath
}  // namespace contrastive_ops
