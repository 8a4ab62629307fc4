// exp for the softmax inner loops. std::exp does not vectorise; this one does (with -O3 and
// a vector ISA), at a relative error below 2e-7, under float32 rounding of the inputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace natten::cpu {

// exp(x) for x <= 0 or moderately positive x; exactly 0 for x below -87 (including -inf),
// which is how masked scores vanish from the softmax.
inline float softmax_exp(float x) {
  float const xc = x < -87.0f ? -87.0f : x;
  // x = n ln2 + r, |r| <= ln2/2; adding 1.5 * 2^23 rounds x/ln2 to an integer in the low bits.
  float const shifted = xc * 1.44269504088896341f + 12582912.0f;
  float const n = shifted - 12582912.0f;
  float const r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, 4);
  uint32_t const scale_bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

inline double softmax_exp(double x) { return std::exp(x); }

// Reductions over independent lanes: without -ffast-math the compiler keeps one running
// scalar (it may not reassociate), which serialises on the adder's latency.
constexpr int kLanes = 16;

template <typename A>
A row_sum(A const* x, int64_t n) {
  A lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l];
  }
  A sum = 0;
  for (; j < n; ++j) sum += x[j];
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

template <typename A>
A row_dot(A const* x, A const* y, int64_t n) {
  A lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l] * y[j + l];
  }
  A sum = 0;
  for (; j < n; ++j) sum += x[j] * y[j];
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

}  // namespace natten::cpu
