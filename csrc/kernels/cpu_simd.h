// Eight-lane float vectors and scalar conversions shared by the CPU kernels (internal, torch-free).
//
// The hot loops are written on GCC vector types directly because the auto-vectoriser leaves exp
// loops scalar without -ffast-math. Without AVX2 (the baseline of a target / target_clones pair)
// GCC splits each operation into two SSE ones. Every function is always_inline: an out-of-line
// copy would be compiled for the baseline ISA and lose the AVX2 caller's registers and speed.
#pragma once
#include <cstdint>
#include <cstring>

// Only inlined internal helpers pass vectors by value, so the 32-byte vector ABI note does not
// apply; left active on purpose for the including kernel, whose own helpers do the same.
#pragma GCC diagnostic ignored "-Wpsabi"

#define D2F_INLINE inline __attribute__((always_inline))

namespace d2f {
namespace simd {

typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
constexpr int kLanes = 8;

D2F_INLINE VecF splat(float x) { return VecF{} + x; }
// memcpy: callers' buffers are aligned, but nothing breaks if one is not.
D2F_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
D2F_INLINE VecI load(const int32_t* p) {
  VecI v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
D2F_INLINE void store(float* p, VecF x) { std::memcpy(p, &x, sizeof(x)); }
// Like maxps / minps: where either lane is NaN the result is b, so passing a running
// accumulator as b makes the reduction skip NaN values.
D2F_INLINE VecF vmax(VecF a, VecF b) { return a > b ? a : b; }
D2F_INLINE VecF vmin(VecF a, VecF b) { return a < b ? a : b; }

// exp for x <= 0 (values minus their max): exactly 0 below -87 (so -inf gives 0), about 1 ulp
// elsewhere. Unmask needs the accuracy (its p > threshold decisions must match the PyTorch
// reference), which rules out a cheaper exp2 on log2e-scaled inputs; attention pays a few more
// operations per score for sharing it, far below its two D-long dot products.
D2F_INLINE VecF exp_nonpos(VecF x) {
  const VecI tiny = x < -87.0f;
  const VecF xc = tiny ? splat(-87.0f) : x;
  const VecF t = xc * 1.44269504088896341f;
  const VecF n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: |t| < 2^22
  VecF r = xc - n * 0.693359375f;  // ln 2 split in two (Cody-Waite) for an exact reduction
  r = r - n * -2.12194440e-4f;
  VecF y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  return tiny ? splat(0.0f) : y * (VecF)bits;
}
D2F_INLINE float exp_nonpos(float x) { return exp_nonpos(splat(x))[0]; }

D2F_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
D2F_INLINE uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

D2F_INLINE float bf16_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN instead of rounding into infinity.
D2F_INLINE uint16_t float_to_bf16(float x) {
  const uint32_t u = as_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Exact for normals and subnormals: shifting the exponent+mantissa into float position and
// scaling by 2^112 rebiases the exponent; inf/nan keep an all-ones exponent.
D2F_INLINE float fp16_to_float(uint16_t h16) {
  const uint32_t h = h16;
  const uint32_t em = h & 0x7fffu;
  const float mag = as_float(em << 13) * 0x1p112f;
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t bits = (em >= 0x7c00u ? special : as_bits(mag)) | ((h & 0x8000u) << 16);
  return as_float(bits);
}

}  // namespace simd
}  // namespace d2f
