// CUDA block-causal attention over a KV cache (flash-style, online softmax in fp32) and store_kv.
//
// One CTA per (query tile, kv head, batch row). A tile's rows are (token, query head of the kv
// head's group) pairs, so each K/V tile staged in shared memory serves the whole group. Each warp
// owns kRowsPerWarp rows: lane j scores key j of the tile, then every lane accumulates its own
// head dims d = lane + 32 * c.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels.h"

namespace d2f {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per CTA
constexpr int kKeyTile = 32;                  // one key per lane
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int DMAX>
constexpr size_t smem_bytes() {
  // q tile, K tile padded by one column (lanes read different rows: no bank conflicts), V tile,
  // key block ids.
  return sizeof(float) * (kRows * DMAX + kKeyTile * (DMAX + 1) + kKeyTile * DMAX) + sizeof(int) * kKeyTile;
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(AttentionParams p) {
  constexpr int kDimsPerLane = DMAX / 32;
  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_s = q_s + kRows * DMAX;
  float* v_s = k_s + kKeyTile * (DMAX + 1);
  int* kbid_s = reinterpret_cast<int*>(v_s + kKeyTile * DMAX);

  const int b = blockIdx.z, kvh = blockIdx.y, r0 = blockIdx.x * kRows;
  const int D = p.head_dim, W = p.window, G = p.heads / p.kv_heads;
  const int rows_total = W * G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* bid = p.block_ids + static_cast<int64_t>(b) * W;

  // Window keys this tile can see: up to the last key of its newest block (ids are
  // non-decreasing over real tokens), after the leading padding.
  int newest = -1;
  for (int r = r0; r < min(r0 + kRows, rows_total); ++r) newest = max(newest, bid[r / G]);
  int key_end = W;
  while (key_end > 0 && (bid[key_end - 1] < 0 || bid[key_end - 1] > newest)) --key_end;
  int key_begin = 0;
  while (key_begin < key_end && bid[key_begin] < 0) ++key_begin;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  const float qscale = p.scale * kLog2e;  // scores in log2 units: exp2f instead of expf
  for (int i = threadIdx.x; i < kRows * DMAX; i += blockDim.x) {
    const int r = r0 + i / DMAX, d = i % DMAX;
    float x = 0.0f;
    if (r < rows_total && d < D)
      x = to_f(q[(r / G) * p.q_row_stride + (kvh * G + r % G) * p.q_head_stride + d]) * qscale;
    q_s[i] = x;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kDimsPerLane];
  int row_bid[kRowsPerWarp];
  // Every loop over a register array is unrolled: indexing one with a loop variable would place
  // it in local memory.
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i;
    row_bid[i] = r < rows_total ? bid[r / G] : -1;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) o[i][c] = 0.0f;
  }

  // Index values are not checked on the host under CUDA-graph capture: out-of-range ones must
  // still never read outside the cache, so such a row reads no cache at all.
  const int crow_in = p.cache_rows ? p.cache_rows[b] : b;
  const bool crow_ok = crow_in >= 0 && crow_in < p.cache_batch;
  const int crow = crow_ok ? crow_in : 0;
  const int n_cache = crow_ok ? min(max(p.cache_lens[b], 0), p.cache_capacity) : 0;
  const int n_keys = n_cache + (key_end - key_begin);
  const int64_t cache_base = (static_cast<int64_t>(crow) * p.cache_capacity * p.kv_heads + kvh) * D;
  const int64_t cache_row_stride = static_cast<int64_t>(p.kv_heads) * D;
  const T* kc = static_cast<const T*>(p.k_cache) + cache_base;
  const T* vc = static_cast<const T*>(p.v_cache) + cache_base;
  const T* kw = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T* vw = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;

  for (int k0 = 0; k0 < n_keys; k0 += kKeyTile) {
    __syncthreads();  // previous tile fully consumed (and q_s written, on the first pass)
    for (int i = threadIdx.x; i < kKeyTile * DMAX; i += blockDim.x) {
      const int j = i / DMAX, d = i % DMAX, u = k0 + j;
      float kx = 0.0f, vx = 0.0f;
      if (u < n_keys && d < D) {
        if (u < n_cache) {
          kx = to_f(kc[u * cache_row_stride + d]);
          vx = to_f(vc[u * cache_row_stride + d]);
        } else {
          const int w = key_begin + u - n_cache;
          kx = to_f(kw[w * p.k_row_stride + d]);
          vx = to_f(vw[w * p.v_row_stride + d]);
        }
      }
      k_s[j * (DMAX + 1) + d] = kx;
      v_s[j * DMAX + d] = vx;
    }
    if (threadIdx.x < kKeyTile) {
      const int u = k0 + threadIdx.x;
      int kb = INT_MAX;  // past the end or padding: seen by no row
      if (u < n_cache) {
        kb = INT_MIN;  // cached: seen by every row
      } else if (u < n_keys) {
        const int x = bid[key_begin + u - n_cache];
        kb = x < 0 ? INT_MAX : x;
      }
      kbid_s[threadIdx.x] = kb;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float* qr = q_s + (warp * kRowsPerWarp + i) * DMAX;
      const float* kr = k_s + lane * (DMAX + 1);
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
      if (kbid_s[lane] > row_bid[i]) s = -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible yet: warp-uniform
      const float alpha = exp2f(m[i] - m_new);
      const float pj = exp2f(s - m_new);
      l[i] = l[i] * alpha + warp_sum(pj);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) o[i][c] *= alpha;
      for (int j = 0; j < kKeyTile; ++j) {
        const float pb = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
        for (int c = 0; c < kDimsPerLane; ++c) o[i][c] += pb * v_s[j * DMAX + c * 32 + lane];
      }
    }
  }

  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(b) * W * p.heads * D;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i;
    if (r >= rows_total) continue;
    const float inv = (row_bid[i] >= 0 && l[i] > 0.0f) ? 1.0f / l[i] : 0.0f;  // padding rows: zeros
    T* dst = out + (static_cast<int64_t>(r / G) * p.heads + kvh * G + r % G) * D;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = c * 32 + lane;
      if (d < D) dst[d] = from_f<T>(o[i][c] * inv);
    }
  }
}

template <typename T, int DMAX>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<DMAX>();
  auto kernel = attention_kernel<T, DMAX>;
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
  }
  const int rows_total = p.window * (p.heads / p.kv_heads);
  dim3 grid((rows_total + kRows - 1) / kRows, p.kv_heads, p.batch);
  kernel<<<grid, kWarps * 32, bytes, stream>>>(p);
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionParams& p, cudaStream_t stream) {
  if (p.head_dim <= 64) return launch_attention<T, 64>(p, stream);
  if (p.head_dim <= 128) return launch_attention<T, 128>(p, stream);
  return launch_attention<T, 256>(p, stream);
}

// grid (W, B): block copies window row i of row b (all kv heads) when i < src_len[b], in units U
// of `per_unit` elements (a 16-byte vector when every address allows it, else one element).
template <typename U>
__global__ void store_kv_kernel(StoreKVParams p, int per_unit) {
  const int i = blockIdx.x, b = blockIdx.y;
  if (i >= p.src_len[b]) return;
  const int crow = p.cache_rows ? p.cache_rows[b] : b;
  const int64_t src = p.src_start[b] + i, at = static_cast<int64_t>(p.cache_lens[b]) + i;
  // Unchecked values under CUDA-graph capture (see the attention kernel): never write out of range.
  if (crow < 0 || crow >= p.cache_batch || src < 0 || src >= p.window || at < 0 || at >= p.cache_capacity) return;
  const int head_units = p.head_dim / per_unit;
  const int64_t dst = (static_cast<int64_t>(crow) * p.cache_capacity + at) * p.kv_heads * head_units;
  const U* __restrict__ k = static_cast<const U*>(p.k) + (b * p.k_batch_stride + src * p.k_row_stride) / per_unit;
  const U* __restrict__ v = static_cast<const U*>(p.v) + (b * p.v_batch_stride + src * p.v_row_stride) / per_unit;
  U* __restrict__ kc = static_cast<U*>(p.k_cache) + dst;
  U* __restrict__ vc = static_cast<U*>(p.v_cache) + dst;
  const int64_t k_head = p.k_head_stride / per_unit, v_head = p.v_head_stride / per_unit;
  for (int e = threadIdx.x; e < p.kv_heads * head_units; e += blockDim.x) {
    const int h = e / head_units, d = e % head_units;
    kc[e] = k[h * k_head + d];
    vc[e] = v[h * v_head + d];
  }
}

}  // namespace

int attention_cuda(const AttentionParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, s);
    case DType::kFloat16: return dispatch_head_dim<__half>(p, s);
    default: return dispatch_head_dim<float>(p, s);
  }
}

void store_kv_cuda(const StoreKVParams& p, void* stream) {
  dim3 grid(p.window, p.batch);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const int per_vec = 16 / elem;
  bool vec = p.head_dim % per_vec == 0 && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_cache) &&
             aligned16(p.v_cache);
  for (int64_t stride : {p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.v_batch_stride, p.v_row_stride,
                         p.v_head_stride})
    vec = vec && stride % per_vec == 0;
  if (vec) {
    store_kv_kernel<uint4><<<grid, 256, 0, s>>>(p, per_vec);
  } else if (elem == 4) {
    store_kv_kernel<float><<<grid, 256, 0, s>>>(p, 1);
  } else {
    store_kv_kernel<uint16_t><<<grid, 256, 0, s>>>(p, 1);  // bf16 and fp16 are both 2-byte copies
  }
}

}  // namespace d2f
