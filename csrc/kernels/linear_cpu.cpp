// A linear layer at a few rows (LinearParams): the weight matrix streams through once, a tile of
// output features at a time, while the few input rows stay in L1. Each tile's 4 x 2 block of
// dot products keeps eight vector accumulators in registers, so every weight load feeds two rows.
#include <omp.h>

#include <algorithm>

#include "cpu_simd.h"
#include "kernels.h"

#pragma GCC optimize("fp-contract=fast")

namespace d2f {
namespace {

using simd::VecF;
constexpr int kTileOut = 4, kTileRows = 2;  // 8 accumulators: one sums8

// Pairwise lane sums of a and b: {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7}.
D2F_INLINE VecF hadd(VecF a, VecF b) {
  typedef int32_t Idx __attribute__((vector_size(32)));
  return __builtin_shuffle(a, b, Idx{0, 2, 8, 10, 4, 6, 12, 14}) + __builtin_shuffle(a, b, Idx{1, 3, 9, 11, 5, 7, 13, 15});
}

// The lane sums of eight vectors, in their order, as one vector (a transpose-and-add tree, far
// cheaper than eight one-by-one reductions, which cost as much as a tile's whole K loop at K = 128).
D2F_INLINE VecF sums8(const VecF (&a)[8]) {
  typedef int32_t Idx __attribute__((vector_size(32)));
  const VecF lo = hadd(hadd(a[0], a[1]), hadd(a[2], a[3])), hi = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shuffle(lo, hi, Idx{0, 1, 2, 3, 8, 9, 10, 11}) + __builtin_shuffle(lo, hi, Idx{4, 5, 6, 7, 12, 13, 14, 15});
}

// Outputs [v0, v0 + nv) of input rows [r0, r0 + nr), nv <= 4, nr <= 2. A
// short tile repeats its last row rather than branching in the inner loop; only real ones are
// stored. The body sums lanes of 8, then the lanes by sums8, then the tail of K past a multiple
// of 8.
D2F_INLINE void tile(const LinearParams& p, int v0, int nv, int r0, int nr) {
  const int K = p.in_features, body = K - K % simd::kLanes;
  const float* x[kTileRows];
  const float* w[kTileOut];
  for (int r = 0; r < kTileRows; ++r) x[r] = p.input + (r0 + std::min(r, nr - 1)) * p.input_stride;
  for (int v = 0; v < kTileOut; ++v) w[v] = p.weight + static_cast<int64_t>(v0 + std::min(v, nv - 1)) * K;
  VecF acc[kTileOut * kTileRows] = {};  // acc[v * kTileRows + r]
  for (int k = 0; k < body; k += simd::kLanes) {
    const VecF x0 = simd::load(x[0] + k), x1 = simd::load(x[1] + k);
    for (int v = 0; v < kTileOut; ++v) {
      const VecF wv = simd::load(w[v] + k);
      acc[v * kTileRows] += wv * x0;
      acc[v * kTileRows + 1] += wv * x1;
    }
  }
  const VecF sums = sums8(acc);
  for (int v = 0; v < nv; ++v) {
    for (int r = 0; r < nr; ++r) {
      float s = sums[v * kTileRows + r];
      for (int k = body; k < K; ++k) s += w[v][k] * x[r][k];
      p.output[static_cast<int64_t>(r0 + r) * p.out_features + v0 + v] = s;
    }
  }
}

// Every input row against outputs [v0, v0 + nv): their weight rows stay in L1 across the rows.
D2F_INLINE void tile_all_rows(const LinearParams& p, int v0, int nv) {
  for (int r0 = 0; r0 < p.rows; r0 += kTileRows) tile(p, v0, nv, r0, std::min(kTileRows, p.rows - r0));
}

// The tile is compute-bound from about 8 rows on, where fused multiply-adds halve its work.
// ISO C++ does not contract a * b + c (the file's pragma above allows it), and the baseline ISA
// has no FMA, so the tiles are compiled once more for AVX2 + FMA and picked at run time.
__attribute__((target("avx2,fma"))) void tile_fma(const LinearParams& p, int v0, int nv) { tile_all_rows(p, v0, nv); }

void tile_plain(const LinearParams& p, int v0, int nv) { tile_all_rows(p, v0, nv); }

}  // namespace

void linear_cpu(const LinearParams& p) {
  static const bool fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const auto run = fma ? tile_fma : tile_plain;
  const int tiles = p.out_features / kTileOut + (p.out_features % kTileOut != 0);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tiles; ++t) {
    const int v0 = t * kTileOut;
    run(p, v0, std::min(kTileOut, p.out_features - v0));
  }
}

}  // namespace d2f
