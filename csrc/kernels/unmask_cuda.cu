// CUDA unmasking, the rule of UnmaskParams (params.h):
// 1. stats_kernel: `splits` CTAs per masked position each reduce a slice of its logits row, read
//    with 16-byte vector loads, to a Partial (max, sum, argmax, second largest, best Gumbel score);
// 2. entropy_kernel (neg_entropy confidence only): the same CTAs sum q log q over their slices
//    once the row's max and sum are known;
// 3. decide_kernel: one CTA per batch row combines each position's partials into
//    (token, p, confidence), then applies the per-block rule.
// Every reduction runs in a fixed order, so the results do not depend on scheduling.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels.h"

namespace d2f {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A CTA's slice of a row is at least this long: shorter ones would cost more in partials and
// launch than they save.
constexpr int kMinSlice = 4096;

// Element types: a 16-byte vector of kN elements, and one element, as float.
struct F32 {
  using T = float;
  static constexpr int kN = 4;
  __device__ static float one(const T* p) { return *p; }
  __device__ static void unpack(uint4 u, float* x) {
    x[0] = __uint_as_float(u.x), x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z), x[3] = __uint_as_float(u.w);
  }
};
struct BF16 {
  using T = uint16_t;
  static constexpr int kN = 8;
  __device__ static float one(const T* p) { return __uint_as_float(static_cast<uint32_t>(*p) << 16); }
  __device__ static void unpack(uint4 u, float* x) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
struct F16 {
  using T = __half;
  static constexpr int kN = 8;
  __device__ static float one(const T* p) { return __half2float(*p); }
  __device__ static void unpack(uint4 u, float* x) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], sizeof(h));
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
};

// e_v of the rule for x <= m: values equal to the max weigh 1, so that +inf maxima (and a row of
// -inf only) are well defined; for x < m, x - m is never NaN.
__device__ __forceinline__ float weight(float x, float m) { return x == m ? 1.0f : expf(x - m); }

// A sum of weights against max `from`, restated against max `to` >= from.
__device__ __forceinline__ float rescale(float s, float from, float to) {
  return from == to ? s : s * expf(from - to);
}

// Statistics of a set of values x_v of one row.
struct Partial {
  float m;   // max
  float s;   // sum of weight(x, m)
  float t2;  // second largest, duplicates of m counted
  float bx;  // largest value other than the mask token's: [MASK] is never a decoded token
  int arg;   // its lowest index; INT_MAX: no such value seen
  float g;   // best x + Gumbel noise other than the mask token's
  int gtok;  // its lowest index; INT_MAX: none seen
  float gx;  // its x
};
static_assert(sizeof(Partial) + sizeof(float) <= kUnmaskPartialBytes, "partials workspace too small");

__device__ __forceinline__ Partial identity() {
  return Partial{-INFINITY, 0.0f, -INFINITY, -INFINITY, INT_MAX, -INFINITY, INT_MAX, -INFINITY};
}

__device__ __forceinline__ Partial merge(const Partial& a, const Partial& b) {
  Partial r;
  r.m = fmaxf(a.m, b.m);
  r.s = rescale(a.s, a.m, r.m) + rescale(b.s, b.m, r.m);
  r.t2 = fmaxf(fmaxf(a.t2, b.t2), fminf(a.m, b.m));
  const bool take_b = b.bx > a.bx || (b.bx == a.bx && b.arg < a.arg);
  r.bx = take_b ? b.bx : a.bx;
  r.arg = take_b ? b.arg : a.arg;
  const bool gb = b.g > a.g || (b.g == a.g && b.gtok < a.gtok);
  r.g = gb ? b.g : a.g;
  r.gtok = gb ? b.gtok : a.gtok;
  r.gx = gb ? b.gx : a.gx;
  return r;
}

__device__ __forceinline__ Partial shfl_down(const Partial& a, int offset) {
  Partial r;
  r.m = __shfl_down_sync(0xffffffffu, a.m, offset);
  r.s = __shfl_down_sync(0xffffffffu, a.s, offset);
  r.t2 = __shfl_down_sync(0xffffffffu, a.t2, offset);
  r.bx = __shfl_down_sync(0xffffffffu, a.bx, offset);
  r.arg = __shfl_down_sync(0xffffffffu, a.arg, offset);
  r.g = __shfl_down_sync(0xffffffffu, a.g, offset);
  r.gtok = __shfl_down_sync(0xffffffffu, a.gtok, offset);
  r.gx = __shfl_down_sync(0xffffffffu, a.gx, offset);
  return r;
}

// The CTA's values merged in a fixed tree; valid in thread 0.
__device__ Partial block_merge(Partial t) {
  __shared__ Partial warp_part[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off >>= 1) t = merge(t, shfl_down(t, off));
  if (lane == 0) warp_part[warp] = t;
  __syncthreads();
  if (warp == 0) {
    t = lane < kWarps ? warp_part[lane] : identity();
    for (int off = kWarps / 2; off > 0; off >>= 1) t = merge(t, shfl_down(t, off));
  }
  return t;
}

// The CTA's sum in a fixed tree; valid in thread 0.
__device__ float block_sum(float x) {
  __shared__ float warp_sum[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  if (lane == 0) warp_sum[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? warp_sum[lane] : 0.0f;
    for (int off = kWarps / 2; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

// Whether (b, w) is a masked position to decide; other block ids (-1: padding; >= NB, which only
// the op's value checks reject) are skipped so that counts stays in bounds.
__device__ __forceinline__ bool is_candidate(const UnmaskParams& p, int64_t i) {
  const int blk = p.block_ids[i];
  return p.tokens[i] == p.mask_id && blk >= 0 && blk < p.num_blocks;
}

template <class L>
__device__ const typename L::T* position_row(const UnmaskParams& p, int b, int w) {
  using T = typename L::T;
  if (p.prev_logits == nullptr) return static_cast<const T*>(p.logits) + b * p.logits_batch_stride + w * p.logits_row_stride;
  if (w == 0) return static_cast<const T*>(p.prev_logits) + b * p.prev_batch_stride;
  return static_cast<const T*>(p.logits) + b * p.logits_batch_stride + (w - 1) * p.logits_row_stride;
}

// Calls f(x, v) for the values of slice `split` of `splits` of a row, x as the rule reads it
// (NaN as -inf, divided by T when sampling), v increasing per thread. The row's 16-byte aligned
// middle is split by whole vectors; slice 0 also takes the unaligned head, the last the tail.
template <class L, bool kSample, class F>
__device__ __forceinline__ void for_slice(const typename L::T* row, int vocab, float temperature, int split,
                                          int splits, F f) {
  auto read = [&](float x) {
    if (kSample) x = x / temperature;  // IEEE division, as the reference divides
    return isnan(x) ? -INFINITY : x;
  };
  const int tid = threadIdx.x;
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16);
  const int head = min(vocab, static_cast<int>((16 - misalign) % 16 / sizeof(typename L::T)));
  const int nvec = (vocab - head) / L::kN;
  const int per = (nvec + splits - 1) / splits;
  const int j0 = split * per, j1 = min(nvec, j0 + per);
  if (split == 0 && tid < head) f(read(L::one(row + tid)), tid);
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  for (int j = j0 + tid; j < j1; j += kThreads) {
    float x[L::kN];
    L::unpack(__ldg(vec + j), x);
#pragma unroll
    for (int k = 0; k < L::kN; ++k) f(read(x[k]), head + j * L::kN + k);
  }
  const int tail = head + nvec * L::kN;
  if (split == splits - 1 && tail + tid < vocab) f(read(L::one(row + tail + tid)), tail + tid);
}

__device__ __forceinline__ Partial* partials_of(const UnmaskParams& p, int64_t i) {
  return static_cast<Partial*>(p.partials) + i * kUnmaskMaxSplits;
}
__device__ __forceinline__ float* entropy_of(const UnmaskParams& p, int64_t i) {
  const int64_t positions = static_cast<int64_t>(p.batch) * p.window;
  return reinterpret_cast<float*>(static_cast<Partial*>(p.partials) + positions * kUnmaskMaxSplits) +
         i * kUnmaskMaxSplits;
}

__device__ Partial merged(const UnmaskParams& p, int64_t i, int splits) {
  const Partial* part = partials_of(p, i);
  Partial r = part[0];
  for (int c = 1; c < splits; ++c) r = merge(r, part[c]);
  return r;
}

// grid (splits, W, B)
template <class L, bool kSample>
__global__ void __launch_bounds__(kThreads) stats_kernel(UnmaskParams p, int splits) {
  const int split = blockIdx.x, w = blockIdx.y, b = blockIdx.z;
  const int64_t i = static_cast<int64_t>(b) * p.window + w;
  if (!is_candidate(p, i)) return;  // uniform over the CTA: no barrier is skipped by a subset
  const uint32_t key = noise_key(p.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(w));
  const int64_t mask_id = p.mask_id;
  Partial t = identity();
  for_slice<L, kSample>(position_row<L>(p, b, w), p.vocab, p.temperature, split, splits, [&](float x, int v) {
    if (x > t.m) {
      t.s = t.s * expf(t.m - x) + 1.0f;  // t.m < x: the exponent is never NaN
      t.t2 = t.m;
      t.m = x;
    } else {
      t.s += weight(x, t.m);
      t.t2 = fmaxf(t.t2, x);
    }
    if (v == mask_id) return;
    if (x > t.bx || t.arg == INT_MAX) {  // v grows per thread: the first of equal values stays
      t.bx = x;
      t.arg = v;
    }
    if (kSample && (x + kGumbelBound > t.g || t.gtok == INT_MAX)) {
      const float score = x + -logf(-logf(noise_uniform(key, static_cast<uint32_t>(v))));
      if (score > t.g || t.gtok == INT_MAX) {
        t.g = score;
        t.gtok = v;
        t.gx = x;
      }
    }
  });
  t = block_merge(t);
  if (threadIdx.x == 0) partials_of(p, i)[split] = t;
}

// grid (splits, W, B); runs after stats_kernel.
template <class L, bool kSample>
__global__ void __launch_bounds__(kThreads) entropy_kernel(UnmaskParams p, int splits) {
  const int split = blockIdx.x, w = blockIdx.y, b = blockIdx.z;
  const int64_t i = static_cast<int64_t>(b) * p.window + w;
  if (!is_candidate(p, i)) return;
  __shared__ float row_m, row_s;
  if (threadIdx.x == 0) {
    const Partial all = merged(p, i, splits);
    row_m = all.m;
    row_s = all.s;
  }
  __syncthreads();
  const float m = row_m, s = row_s;
  float acc = 0.0f;
  for_slice<L, kSample>(position_row<L>(p, b, w), p.vocab, p.temperature, split, splits, [&](float x, int) {
    const float q = weight(x, m) / s;
    acc += q * logf(q + 1e-10f);
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) entropy_of(p, i)[split] = acc;
}

// Whether masked position w of row b, not above the threshold, is its block's forced pick:
// the block is fully activated, nothing in it passes the threshold and no position in it has a
// higher confidence, or an equal one at a lower index (confidences are never NaN, so exactly one
// position is picked). Rows are short (a window), so a scan is cheaper than any per-block table.
__device__ bool forced_pick(const UnmaskParams& p, int b, int w, int blk) {
  if (!p.fully_activated[b * p.fully_activated_batch_stride + blk]) return false;
  const int64_t base = static_cast<int64_t>(b) * p.window;
  const float conf = p.cand_conf[base + w];
  for (int u = 0; u < p.window; ++u) {
    const int64_t j = base + u;
    if (p.cand_token[j] < 0 || p.block_ids[j] != blk) continue;
    if (p.cand_prob[j] > p.skip_threshold) return false;
    if (p.cand_conf[j] > conf || (p.cand_conf[j] == conf && u < w)) return false;
  }
  return true;
}

// grid (B); runs after stats_kernel (and entropy_kernel).
__global__ void __launch_bounds__(kThreads) decide_kernel(UnmaskParams p, int splits) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(b) * p.window;
  int32_t* counts = p.counts + static_cast<int64_t>(b) * p.num_blocks;
  __shared__ int eos;
  if (tid == 0) eos = INT_MAX;
  for (int k = tid; k < p.num_blocks; k += kThreads) counts[k] = 0;
  for (int w = tid; w < p.window; w += kThreads) {
    const int64_t i = base + w;
    if (!is_candidate(p, i)) {
      p.cand_token[i] = -1;
      continue;
    }
    const Partial all = merged(p, i, splits);
    const bool sample = p.temperature > 0.0f;
    // arg is INT_MAX only for a vocabulary of the mask token alone: nothing else to pick.
    const bool only_mask = all.arg == INT_MAX;
    const int64_t tok = only_mask ? p.mask_id : (sample ? all.gtok : all.arg);
    const float prob = weight(only_mask ? all.m : sample ? all.gx : all.bx, all.m) / all.s;
    float conf = prob;
    if (p.confidence == Confidence::kMargin) conf = 1.0f / all.s - weight(all.t2, all.m) / all.s;
    if (p.confidence == Confidence::kNegEntropy) {
      const float* ent = entropy_of(p, i);
      conf = ent[0];
      for (int c = 1; c < splits; ++c) conf += ent[c];
    }
    p.cand_token[i] = tok;
    p.cand_prob[i] = prob;
    p.cand_conf[i] = conf;
  }
  __syncthreads();
  // Non-candidates are marked with cand_token < 0, so writing tokens here races with nothing.
  for (int w = tid; w < p.window; w += kThreads) {
    const int64_t i = base + w;
    const int64_t tok = p.cand_token[i];
    if (tok < 0) continue;
    const int blk = p.block_ids[i];
    if (p.cand_prob[i] > p.skip_threshold || forced_pick(p, b, w, blk)) {
      p.tokens[i] = tok;
      atomicAdd(&counts[blk], 1);
      if (p.eos_id >= 0 && tok == p.eos_id) atomicMin(&eos, blk);
    }
  }
  __syncthreads();
  if (tid == 0) p.eos_block[b] = eos == INT_MAX ? -1 : eos;
}

// CTAs per position: enough for a few waves over the device when batch x window is small,
// never slices shorter than kMinSlice.
int choose_splits(const UnmaskParams& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t positions = static_cast<int64_t>(p.batch) * p.window;
  const int64_t want = (4 * static_cast<int64_t>(sms) + positions - 1) / positions;
  const int64_t most = (p.vocab + kMinSlice - 1) / kMinSlice;
  const int64_t splits = want < most ? want : most;
  return static_cast<int>(splits < 1 ? 1 : splits > kUnmaskMaxSplits ? kUnmaskMaxSplits : splits);
}

template <class L, bool kSample>
void launch(const UnmaskParams& p, int splits, cudaStream_t s) {
  const dim3 grid(splits, p.window, p.batch);
  stats_kernel<L, kSample><<<grid, kThreads, 0, s>>>(p, splits);
  if (p.confidence == Confidence::kNegEntropy) entropy_kernel<L, kSample><<<grid, kThreads, 0, s>>>(p, splits);
  decide_kernel<<<p.batch, kThreads, 0, s>>>(p, splits);
}

template <class L>
void launch(const UnmaskParams& p, int splits, cudaStream_t s) {
  if (p.temperature > 0.0f) {
    launch<L, true>(p, splits, s);
  } else {
    launch<L, false>(p, splits, s);
  }
}

}  // namespace

void unmask_cuda(const UnmaskParams& p, void* stream) {
  if (p.batch == 0 || p.window == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int splits = choose_splits(p);
  switch (p.dtype) {
    case DType::kFloat32: launch<F32>(p, splits, s); break;
    case DType::kBFloat16: launch<BF16>(p, splits, s); break;
    default: launch<F16>(p, splits, s); break;
  }
}

}  // namespace d2f
