// CUDA unmasking: one CTA reduces one masked position's logits row (phase 1), then one CTA per
// batch row applies the per-block rule (phase 2). Reductions run in a fixed tree order, so the
// results do not depend on scheduling.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels.h"

namespace d2f {
namespace {

constexpr int kThreads = 256;
constexpr double kGumbelBound = 17.5;  // > max Gumbel noise, -log(-log(1 - 2^-25)) ~ 17.33

__device__ __forceinline__ float load_logit(const void* row, int v, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(row)[v];
    case DType::kBFloat16:
      return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(row)[v]) << 16);
    default:
      return __half2float(static_cast<const __half*>(row)[v]);
  }
}

// Partial statistics of a slice of one row.
struct Partial {
  float m;    // max
  float s;    // sum of exp(x - m)
  float bx;   // largest value other than the mask token's: [MASK] is never a decoded token
  int arg;    // its lowest index
  float t2;   // second largest, duplicates of m counted
  double g;   // best Gumbel score
  int gtok;   // its index (lowest on ties)
  float gx;   // its scaled logit
};

__device__ __forceinline__ float scaled_sum(float s, float m_from, float m_to) {
  return m_from == -INFINITY ? 0.0f : s * expf(m_from - m_to);
}

__device__ __forceinline__ Partial merge(const Partial& a, const Partial& b) {
  Partial r;
  r.m = fmaxf(a.m, b.m);
  r.s = r.m == -INFINITY ? 0.0f : scaled_sum(a.s, a.m, r.m) + scaled_sum(b.s, b.m, r.m);
  const bool take_b = b.bx > a.bx || (b.bx == a.bx && b.arg < a.arg);
  r.arg = take_b ? b.arg : a.arg;
  r.bx = take_b ? b.bx : a.bx;
  r.t2 = fmaxf(fmaxf(a.t2, b.t2), fminf(a.m, b.m));
  const bool gb = b.g > a.g || (b.g == a.g && b.gtok < a.gtok);
  r.g = gb ? b.g : a.g;
  r.gtok = gb ? b.gtok : a.gtok;
  r.gx = gb ? b.gx : a.gx;
  return r;
}

__device__ const void* position_row(const UnmaskParams& p, int b, int w) {
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* base;
  int64_t off;
  if (p.prev_logits == nullptr) {
    base = static_cast<const char*>(p.logits);
    off = b * p.logits_batch_stride + w * p.logits_row_stride;
  } else if (w == 0) {
    base = static_cast<const char*>(p.prev_logits);
    off = b * p.prev_batch_stride;
  } else {
    base = static_cast<const char*>(p.logits);
    off = b * p.logits_batch_stride + (w - 1) * p.logits_row_stride;
  }
  return base + off * elem;
}

__global__ void __launch_bounds__(kThreads) stats_kernel(UnmaskParams p) {
  const int w = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t i = static_cast<int64_t>(b) * p.window + w;
  // Ids past num_blocks (unchecked under CUDA-graph capture) are padding: counts stays in bounds.
  if (p.tokens[i] != p.mask_id || p.block_ids[i] < 0 || p.block_ids[i] >= p.num_blocks) {
    if (tid == 0) p.cand_token[i] = -1;
    return;  // uniform over the CTA: no barrier is skipped by a subset
  }
  const void* row = position_row(p, b, w);
  const bool sample = p.temperature > 0.0f;
  const uint32_t key = noise_key(p.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(w));

  Partial t{-INFINITY, 0.0f, -INFINITY, INT_MAX, -INFINITY, -INFINITY, INT_MAX, -INFINITY};
  for (int v = tid; v < p.vocab; v += kThreads) {
    float x = load_logit(row, v, p.dtype);
    if (sample) x = x / p.temperature;  // IEEE division, as the reference divides
    if (x > t.m) {
      t.s = scaled_sum(t.s, t.m, x) + 1.0f;
      t.t2 = t.m;
      t.m = x;
    } else if (x > -INFINITY) {
      t.s += expf(x - t.m);
      t.t2 = fmaxf(t.t2, x);
    }
    if (v != p.mask_id && x > t.bx) {  // v grows per thread: the first of equal values stays
      t.bx = x;
      t.arg = v;
    }
    if (sample && v != p.mask_id && static_cast<double>(x) + kGumbelBound > t.g) {
      const double score = static_cast<double>(x) - log(-log(noise_uniform(key, static_cast<uint32_t>(v))));
      if (score > t.g) {  // v grows per thread: the first of equal scores stays
        t.g = score;
        t.gtok = v;
        t.gx = x;
      }
    }
  }

  __shared__ Partial part[kThreads];
  __shared__ float entropy[kThreads];
  part[tid] = t;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride) part[tid] = merge(part[tid], part[tid + stride]);
    __syncthreads();
  }
  const Partial all = part[0];

  float conf_entropy = 0.0f;
  if (p.confidence == Confidence::kNegEntropy) {
    float acc = 0.0f;
    for (int v = tid; v < p.vocab; v += kThreads) {
      float x = load_logit(row, v, p.dtype);
      if (sample) x = x / p.temperature;
      const float q = expf(x - all.m) / all.s;
      acc += q * logf(q + 1e-10f);
    }
    entropy[tid] = acc;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (tid < stride) entropy[tid] += entropy[tid + stride];
      __syncthreads();
    }
    conf_entropy = entropy[0];
  }

  if (tid == 0) {
    // A row of -inf only (not produced by any caller) still yields an in-range token.
    const int arg = all.arg == INT_MAX ? 0 : all.arg;
    const int tok = sample ? (all.gtok == INT_MAX ? 0 : all.gtok) : arg;
    const float prob = expf((sample ? all.gx : all.bx) - all.m) / all.s;
    float conf = prob;
    if (p.confidence == Confidence::kMargin) conf = 1.0f / all.s - expf(all.t2 - all.m) / all.s;
    if (p.confidence == Confidence::kNegEntropy) conf = conf_entropy;
    p.cand_token[i] = tok;
    p.cand_prob[i] = prob;
    p.cand_conf[i] = conf;
  }
}

// Whether masked position w of row b, not above the threshold, is its block's forced pick:
// the block is fully activated, nothing in it passes the threshold and no position in it has a
// higher confidence, or an equal one at a lower index. Rows are short (a window), so a scan is
// cheaper than any per-block table.
__device__ bool forced_pick(const UnmaskParams& p, int b, int w, int blk) {
  if (!p.fully_activated[b * p.fully_activated_batch_stride + blk]) return false;
  const int64_t base = static_cast<int64_t>(b) * p.window;
  const float conf = p.cand_conf[base + w];
  for (int u = 0; u < p.window; ++u) {
    const int64_t j = base + u;
    if (p.cand_token[j] < 0 || p.block_ids[j] != blk) continue;
    if (p.cand_prob[j] > p.threshold) return false;
    if (p.cand_conf[j] > conf || (p.cand_conf[j] == conf && u < w)) return false;
  }
  return true;
}

__global__ void __launch_bounds__(kThreads) decide_kernel(UnmaskParams p) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(b) * p.window;
  int32_t* counts = p.counts + static_cast<int64_t>(b) * p.num_blocks;
  __shared__ int eos;
  if (tid == 0) eos = INT_MAX;
  for (int k = tid; k < p.num_blocks; k += kThreads) counts[k] = 0;
  __syncthreads();
  // Phase 1 marked non-candidates with cand_token < 0, so writing tokens here races with nothing.
  for (int w = tid; w < p.window; w += kThreads) {
    const int64_t i = base + w;
    const int64_t tok = p.cand_token[i];
    if (tok < 0) continue;
    const int blk = p.block_ids[i];
    if (p.cand_prob[i] > p.threshold || forced_pick(p, b, w, blk)) {
      p.tokens[i] = tok;
      atomicAdd(&counts[blk], 1);
      if (p.eos_id >= 0 && tok == p.eos_id) atomicMin(&eos, blk);
    }
  }
  __syncthreads();
  if (tid == 0) p.eos_block[b] = eos == INT_MAX ? -1 : eos;
}

}  // namespace

void unmask_cuda(const UnmaskParams& p, void* stream) {
  if (p.batch == 0 || p.window == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  stats_kernel<<<dim3(p.window, p.batch), kThreads, 0, s>>>(p);
  decide_kernel<<<p.batch, kThreads, 0, s>>>(p);
}

}  // namespace d2f
