// RMSNorm and RoPE on the CPU (RmsNormParams, RopeParams). Each is one pass over a few kilobytes
// at a decoding step's window sizes, so they run on one thread there and split rows over the
// OpenMP threads only at prefill sizes. Each row function has an AVX2 clone beside the baseline.
#include <omp.h>

#include <cmath>

#include "cpu_simd.h"
#include "kernels.h"

// RoPE matches PyTorch's separately rounded products and sum only without fused multiply-adds.
#pragma GCC optimize("fp-contract=off")

namespace d2f {
namespace {

using simd::VecF;
using simd::kLanes;

// Below this many floats a parallel region costs more than the work it splits.
constexpr int64_t kParallelFloats = int64_t{1} << 16;

D2F_INLINE float lane_sum(VecF v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

__attribute__((target_clones("avx2", "default"))) void rms_norm_row(const RmsNormParams& p, int r) {
  const float* x = p.input + r * p.input_stride;
  float* y = p.output + static_cast<int64_t>(r) * p.dim;
  const int D = p.dim, body = D - D % kLanes;
  VecF acc = {};
  for (int d = 0; d < body; d += kLanes) {
    const VecF v = simd::load(x + d);
    acc += v * v;
  }
  float sum = lane_sum(acc);
  for (int d = body; d < D; ++d) sum += x[d] * x[d];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + p.eps);
  const VecF vinv = simd::splat(inv);
  for (int d = 0; d < body; d += kLanes) simd::store(y + d, simd::load(p.weight + d) * (simd::load(x + d) * vinv));
  for (int d = body; d < D; ++d) y[d] = p.weight[d] * (x[d] * inv);
}

__attribute__((target_clones("avx2", "default"))) void rope_head(const RopeParams& p, int t, int h) {
  const float* x = p.input + t * p.token_stride + h * p.head_stride;
  const float* c = p.cos + static_cast<int64_t>(t) * p.head_dim;
  const float* s = p.sin + static_cast<int64_t>(t) * p.head_dim;
  float* y = p.output + (static_cast<int64_t>(t) * p.heads + h) * p.head_dim;
  const int half = p.head_dim / 2, body = half - half % kLanes;
  for (int d = 0; d < body; d += kLanes) {
    const VecF lo = simd::load(x + d), hi = simd::load(x + half + d);
    simd::store(y + d, lo * simd::load(c + d) - hi * simd::load(s + d));
    simd::store(y + half + d, hi * simd::load(c + half + d) + lo * simd::load(s + half + d));
  }
  for (int d = body; d < half; ++d) {
    y[d] = x[d] * c[d] - x[half + d] * s[d];
    y[half + d] = x[half + d] * c[half + d] + x[d] * s[half + d];
  }
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(p.rows) * p.dim >= kParallelFloats)
  for (int r = 0; r < p.rows; ++r) rms_norm_row(p, r);
}

void rope_cpu(const RopeParams& p) {
  const int64_t heads = static_cast<int64_t>(p.tokens) * p.heads;
#pragma omp parallel for schedule(static) if (heads * p.head_dim >= kParallelFloats)
  for (int64_t i = 0; i < heads; ++i) rope_head(p, static_cast<int>(i / p.heads), static_cast<int>(i % p.heads));
}

}  // namespace d2f
