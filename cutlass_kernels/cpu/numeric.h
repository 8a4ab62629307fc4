// Element types of the CPU kernels and their conversion to the accumulation type.
// float16 and bfloat16 are stored as raw 16-bit patterns so that no framework header is
// needed; arithmetic always happens in float (double for double inputs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace natten::cpu {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

template <typename T> struct AccumOf { using type = float; };
template <> struct AccumOf<double> { using type = double; };
template <typename T> using Accum = typename AccumOf<T>::type;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

template <typename A> inline A to_accum(float x) { return static_cast<A>(x); }
template <typename A> inline A to_accum(double x) { return static_cast<A>(x); }
template <typename A> inline A to_accum(BFloat16 x) {
  return static_cast<A>(bits_to_float(static_cast<uint32_t>(x.bits) << 16));
}
template <typename A> inline A to_accum(Half x) {
  // IEEE binary16 -> binary32, subnormals included.
  uint32_t const sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {
    exp = 113;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    out = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  return static_cast<A>(bits_to_float(out));
}

template <typename T> struct FromAccum;
template <> struct FromAccum<float> {
  template <typename A> static float cvt(A x) { return static_cast<float>(x); }
};
template <> struct FromAccum<double> {
  template <typename A> static double cvt(A x) { return static_cast<double>(x); }
};
template <> struct FromAccum<BFloat16> {
  template <typename A> static BFloat16 cvt(A x) {
    uint32_t u = float_to_bits(static_cast<float>(x));
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return {static_cast<uint16_t>(u >> 16)};
  }
};
template <> struct FromAccum<Half> {
  template <typename A> static Half cvt(A x) {
    float const f = static_cast<float>(x);
    uint32_t const u = float_to_bits(f);
    uint32_t const sign = (u >> 16) & 0x8000u;
    uint32_t const a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};
    if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
    if (a < 0x38800000u) {
      // Subnormal or zero: scale into the 10-bit mantissa with round-to-nearest-even.
      float const scaled = std::fabs(f) * 16777216.0f;  // 2^24
      float const r = std::nearbyint(scaled);
      return {static_cast<uint16_t>(sign | static_cast<uint32_t>(r))};
    }
    uint32_t const rounded = a + 0xfffu + ((a >> 13) & 1u);
    return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
  }
};
template <typename T, typename A> inline T from_accum(A x) { return FromAccum<T>::cvt(x); }

}  // namespace natten::cpu
