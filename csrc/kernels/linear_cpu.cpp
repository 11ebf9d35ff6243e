// A linear layer at a few rows (LinearParams): the weight matrix streams through once, a tile of
// output features at a time, while the few input rows stay in L1. Each tile's 3 x 4 block of dot
// products keeps twelve vector accumulators in registers, so every weight load feeds four rows.
#include <omp.h>

#include <algorithm>

#include "cpu_simd.h"
#include "kernels.h"

#pragma GCC optimize("fp-contract=fast")

namespace d2f {
namespace {

using simd::VecF;
typedef int32_t Idx __attribute__((vector_size(32)));
// A tile: 3 output features x up to 4 input rows, twelve vector accumulators. Each step of the K
// loop loads 3 weight and 4 input vectors for 12 multiply-adds; the 4 x 2 tile it replaced loaded
// 6 for 8 and ran about 1.5x slower at the shipped model's shapes. The step holds the 3 weight
// vectors and one input vector at a time: 12 + 3 + 1 is AVX2's 16 registers, where holding the 4
// input vectors and one weight vector (17) spilled an accumulator to the stack, and every step
// then waited on a store and a reload (about 1.5-2x slower).
constexpr int kTileOut = 3, kTileRows = 4;

// Pairwise lane sums of a and b: {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7}.
D2F_INLINE VecF hadd(VecF a, VecF b) {
  return __builtin_shuffle(a, b, Idx{0, 2, 8, 10, 4, 6, 12, 14}) + __builtin_shuffle(a, b, Idx{1, 3, 9, 11, 5, 7, 13, 15});
}

// The lane sums of four vectors, in lanes 0-3 (and again in 4-7). Every vector's lanes are added
// in one tree, ((0+1)+(2+3))+((4+5)+(6+7)), whichever accumulator it is: an output's rounding
// does not depend on its place in a tile, so neither on the row count nor on the thread count.
D2F_INLINE VecF sums4(VecF a, VecF b, VecF c, VecF d) {
  const VecF h = hadd(hadd(a, b), hadd(c, d));
  return h + __builtin_shuffle(h, Idx{4, 5, 6, 7, 0, 1, 2, 3});
}

// Outputs [v0, v0 + nv) of input rows [r0, r0 + ROWS), nv <= 3. A short tile repeats its last
// weight row rather than branching in the inner loop; only real outputs are stored. The body
// sums lanes of 8, then the lanes, then the tail of K past a multiple of 8.
template <int ROWS>
D2F_INLINE void tile(const LinearParams& p, int v0, int nv, int r0) {
  const int K = p.in_features, body = K - K % simd::kLanes;
  const float* x[ROWS];
  const float* w[kTileOut];
  for (int r = 0; r < ROWS; ++r) x[r] = p.input + (r0 + r) * p.input_stride;
  for (int v = 0; v < kTileOut; ++v) w[v] = p.weight + static_cast<int64_t>(v0 + std::min(v, nv - 1)) * K;
  VecF acc[kTileOut * ROWS] = {};  // acc[v * ROWS + r]
  // The first row tile also prefetches the next tile's weight rows (contiguous after this tile's),
  // kTileOut vectors' worth a step, so that they are in cache when the tile ends: a model's
  // weights stream from L3 or memory, and each tile reads only a few KB, too little for the
  // hardware prefetcher to get ahead of the loads.
  const int64_t ahead = r0 == 0 ? std::min(kTileOut, p.out_features - v0 - kTileOut) * static_cast<int64_t>(K) : 0;
  const float* next = p.weight + std::min<int64_t>(v0 + kTileOut, p.out_features) * K;
  for (int k = 0; k < body; k += simd::kLanes) {
    const int64_t at = static_cast<int64_t>(kTileOut) * k;
    if (at < ahead) __builtin_prefetch(next + at);
    if (at + 16 < ahead) __builtin_prefetch(next + at + 16);
    VecF wv[kTileOut];
    for (int v = 0; v < kTileOut; ++v) wv[v] = simd::load(w[v] + k);
    for (int r = 0; r < ROWS; ++r) {
      const VecF xv = simd::load(x[r] + k);
      for (int v = 0; v < kTileOut; ++v) acc[v * ROWS + r] += wv[v] * xv;
    }
  }
  // Padded to whole groups of four with zero vectors, whose sums are not stored.
  constexpr int kSums = (kTileOut * ROWS + 3) / 4 * 4;
  VecF all[kSums] = {};
  for (int i = 0; i < kTileOut * ROWS; ++i) all[i] = acc[i];
  float sums[kSums];
  for (int i = 0; i < kSums; i += 4) {
    const VecF s = sums4(all[i], all[i + 1], all[i + 2], all[i + 3]);
    for (int j = 0; j < 4; ++j) sums[i + j] = s[j];
  }
  for (int v = 0; v < nv; ++v) {
    for (int r = 0; r < ROWS; ++r) {
      float s = sums[v * ROWS + r];
      for (int k = body; k < K; ++k) s += w[v][k] * x[r][k];
      if (p.bias != nullptr) s += p.bias[v0 + v];
      p.output[static_cast<int64_t>(r0 + r) * p.out_features + v0 + v] = s;
    }
  }
}

// Every input row against outputs [v0, v0 + nv): their weight rows stay in L1 across the rows.
D2F_INLINE void tile_all_rows(const LinearParams& p, int v0, int nv) {
  int r0 = 0;
  for (; r0 + kTileRows <= p.rows; r0 += kTileRows) tile<kTileRows>(p, v0, nv, r0);
  switch (p.rows - r0) {
    case 3: tile<3>(p, v0, nv, r0); break;
    case 2: tile<2>(p, v0, nv, r0); break;
    case 1: tile<1>(p, v0, nv, r0); break;
    default: break;
  }
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
