// Tensor-core block-causal attention (FlashAttention-2 style, mma.sync.m16n8k16) for bf16 and
// fp16 at head_dim 64 and 128 on sm_80+. Same semantics as the SIMT kernel (params.h); the torch
// layer chooses between them.
//
// One CTA per (query tile, kv head, batch row, KV split). A tile's 64 rows are (token, query head
// of the group) pairs, as in the SIMT kernel, so each K/V tile staged in shared memory serves the
// whole GQA group. Each of the 4 warps owns 16 rows: its Q fragments stay in registers, scores
// and the output accumulator are fp32 registers, and K/V tiles of 64 keys are double-buffered
// with cp.async so that the next tile loads while this one is multiplied.
//
// Keys form one sequence per row: the row's cached positions, then the window keys its tile can
// see. With split-KV, split s of the grid takes a chunk of the cache (the last one also takes the
// window keys) and writes its normalised output and log2-sum-exp to a workspace; combine_kernel
// merges the splits. Splitting pays when the (row tile, kv head, row) grid leaves SMs idle.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "kernels.h"

namespace d2f {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;  // query rows per CTA: one m16 fragment per warp
constexpr int kKeys = 64;           // keys per K/V tile
// Shared-memory rows are padded by 16 bytes so that the 8 row addresses of one ldmatrix fall in
// distinct banks.
constexpr int kPad = 8;
constexpr int kSplitMinKeys = 256;  // below this many cache positions per split the combine costs more
constexpr int kMaxSplits = 16;
constexpr int kMaxGridZ = 65535;  // batch rows x splits
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr size_t smem_bytes() {
  // Q tile, two K tiles, two V tiles, the key block ids of both buffers.
  return sizeof(uint16_t) * (kRows + 4 * kKeys) * (D + kPad) + sizeof(int) * 2 * kKeys;
}

// cp.async and the m16n8k16 mma need sm_80. An older target in TORCH_CUDA_ARCH_LIST still builds:
// its code traps, and attention_mma_plan never picks this kernel on such a device.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define D2F_BELOW_SM80 1
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#ifdef D2F_BELOW_SM80
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef D2F_BELOW_SM80
  __trap();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef D2F_BELOW_SM80
  __trap();
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// acc (16x8 fp32) += a (16x16, row-major fragment) * b (16x8, column-major fragment).
template <typename T>
__device__ __forceinline__ void mma16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#ifdef D2F_BELOW_SM80
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef D2F_BELOW_SM80
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Fragment coordinates below follow the PTX ISA's m16n8k16 layouts: lane = 4 * g + t holds rows
// g and g + 8 of an accumulator, columns 2t and 2t + 1 of each 8-wide block.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_mma_kernel(AttentionParams p, int splits, int split_keys, float* __restrict__ ws_out,
                         float* __restrict__ ws_lse) {
  constexpr int kStride = D + kPad;  // elements per shared-memory row
  constexpr int kChunks = D / 8;     // 16-byte chunks per row
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* q_s = smem;
  uint16_t* k_s = q_s + kRows * kStride;   // [2][kKeys][kStride]
  uint16_t* v_s = k_s + 2 * kKeys * kStride;
  int* kbid_s = reinterpret_cast<int*>(v_s + 2 * kKeys * kStride);  // [2][kKeys]
  __shared__ int newest_s, key_begin_s, key_end_s;

  const int b = blockIdx.z / splits, split = blockIdx.z % splits, kvh = blockIdx.y, r0 = blockIdx.x * kRows;
  const int W = p.window, G = p.heads / p.kv_heads, rows_total = W * G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int32_t* bid = p.block_ids + static_cast<int64_t>(b) * W;

  if (tid == 0) {
    newest_s = -1;
    key_begin_s = W;
    key_end_s = 0;
  }
  __syncthreads();
  if (tid < kRows && r0 + tid < rows_total) atomicMax(&newest_s, bid[(r0 + tid) / G]);
  __syncthreads();
  const int newest = newest_s;
  if (newest < 0) {  // every row of the tile is padding: zeros (with splits, combine_kernel writes them)
    if (splits == 1) {
      T* out = static_cast<T*>(p.out);
      for (int c = tid; c < kRows * kChunks; c += kThreads) {
        const int r = r0 + c / kChunks;
        if (r >= rows_total) break;
        const int64_t row = (static_cast<int64_t>(b) * W + r / G) * p.heads + kvh * G + r % G;
        *reinterpret_cast<uint4*>(out + row * D + c % kChunks * 8) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  // Window keys the tile can see: from the first real token to the last key of its newest block.
  for (int w = tid; w < W; w += kThreads) {
    const int x = bid[w];
    if (x >= 0) {
      atomicMin(&key_begin_s, w);
      if (x <= newest) atomicMax(&key_end_s, w + 1);
    }
  }
  __syncthreads();
  const int key_begin = key_begin_s, key_end = key_end_s;

  // As in the SIMT kernel: index values unchecked under CUDA-graph capture never read outside
  // the cache (such a row reads no cache at all).
  const int crow_in = p.cache_rows ? p.cache_rows[b] : b;
  const bool crow_ok = crow_in >= 0 && crow_in < p.cache_batch;
  const int crow = crow_ok ? crow_in : 0;
  const int n_cache = crow_ok ? min(max(p.cache_lens[b], 0), p.cache_capacity) : 0;
  const int n_keys = n_cache + (key_end - key_begin);
  const int u_begin = min(split * split_keys, n_cache);
  const int u_end = split == splits - 1 ? n_keys : min((split + 1) * split_keys, n_cache);
  const int u_cache_end = min(u_end, n_cache);  // keys [u_begin, u_cache_end) are cached positions

  const int64_t cache_row_stride = static_cast<int64_t>(p.kv_heads) * D;
  const int64_t cache_base = (static_cast<int64_t>(crow) * p.cache_capacity * p.kv_heads + kvh) * D;
  const T* kc = static_cast<const T*>(p.k_cache) + cache_base;
  const T* vc = static_cast<const T*>(p.v_cache) + cache_base;
  const T* kw = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T* vw = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;

  const T* qb = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int i = c / kChunks, d = c % kChunks * 8, r = r0 + i;
    const bool ok = r < rows_total;
    const T* src = ok ? qb + (r / G) * p.q_row_stride + (kvh * G + r % G) * p.q_head_stride + d : qb;
    cp_async16(smem_addr(q_s + i * kStride + d), src, ok);
  }

  // Keys [u0, u0 + kKeys) into buffer `buf`; keys past u_end are zeros (a zero probability times
  // stale data could be NaN) with block id INT_MAX, seen by no row.
  auto load_tile = [&](int u0, int buf) {
    uint16_t* ks = k_s + buf * kKeys * kStride;
    uint16_t* vs = v_s + buf * kKeys * kStride;
    for (int c = tid; c < kKeys * kChunks; c += kThreads) {
      const int j = c / kChunks, d = c % kChunks * 8, u = u0 + j;
      const bool ok = u < u_end;
      const T* ksrc = kc;
      const T* vsrc = vc;
      if (ok && u < n_cache) {
        ksrc = kc + u * cache_row_stride + d;
        vsrc = vc + u * cache_row_stride + d;
      } else if (ok) {
        const int w = key_begin + u - n_cache;
        ksrc = kw + w * p.k_row_stride + d;
        vsrc = vw + w * p.v_row_stride + d;
      }
      cp_async16(smem_addr(ks + j * kStride + d), ksrc, ok);
      cp_async16(smem_addr(vs + j * kStride + d), vsrc, ok);
    }
    if (tid < kKeys) {
      const int u = u0 + tid;
      int kb = INT_MAX;
      if (u < u_cache_end) {
        kb = INT_MIN;  // cached: seen by every row
      } else if (u < u_end) {
        const int x = bid[key_begin + u - n_cache];
        kb = x < 0 ? INT_MAX : x;
      }
      kbid_s[buf * kKeys + tid] = kb;
    }
  };

  const int n_tiles = (u_end - u_begin + kKeys - 1) / kKeys;
  if (n_tiles > 0) load_tile(u_begin, 0);
  cp_async_commit();  // group 0: Q and the first tile

  int row_bid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + warp * 16 + g + 8 * i;
    row_bid[i] = r < rows_total ? bid[r / G] : -1;
  }
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2f instead of expf
  // The row and column this lane addresses for ldmatrix.x4 (lanes 8i..8i+7: matrix i's rows).
  const int q_row = warp * 16 + lane % 16, q_col = lane / 16 * 8;
  const int k_row = lane % 8 + lane / 16 * 8, k_col = (lane / 8) % 2 * 8;
  const int v_row = lane % 8 + (lane / 8) % 2 * 8, v_col = lane / 16 * 8;
  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's columns only

  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_tiles) load_tile(u_begin + (it + 1) * kKeys, buf ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning this tile
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], smem_addr(q_s + q_row * kStride + kk * 16 + q_col));
    }

    // S = Q K^T: each ldmatrix.x4 gives the B fragments of two 8-key blocks for 16 head dims.
    const uint16_t* ks = k_s + buf * kKeys * kStride;
    float s[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int np = 0; np < kKeys / 16; ++np) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kf[4];
        ldmatrix_x4(kf, smem_addr(ks + (np * 16 + k_row) * kStride + kk * 16 + k_col));
        mma16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Whole tiles of cached positions are seen by every row; others need the block-causal mask.
    const int u0 = u_begin + it * kKeys;
    const bool masked = u0 + kKeys > u_cache_end;
    const int* kb = kbid_s + buf * kKeys;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale2;
        if (masked && kb[j * 8 + 2 * t4 + (e & 1)] > row_bid[e / 2]) x = -INFINITY;
        s[j][e] = x;
      }
    }

    // Online softmax; the 4 lanes of a quad share a row.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: all terms are 0
      const float alpha = exp2f(m[i] - base);
      m[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        s[j][2 * i] = exp2f(s[j][2 * i] - base);
        s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - base);
        sum += s[j][2 * i] + s[j][2 * i + 1];
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * i] *= alpha;
        o[j][2 * i + 1] *= alpha;
      }
    }

    // O += P V: the score accumulators of two 8-key blocks are the A fragment of 16 keys; V
    // is [key][dim] in shared memory, so ldmatrix.trans yields its column-major B fragments.
    const uint16_t* vs = v_s + buf * kKeys * kStride;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, smem_addr(vs + (kk * 16 + v_row) * kStride + dp * 16 + v_col));
        mma16816<T>(o[2 * dp], pa, vf[0], vf[1]);
        mma16816<T>(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's load
  }
  cp_async_wait<0>();  // an empty split never waited for its Q copy

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  const int64_t total_rows = static_cast<int64_t>(p.batch) * W * p.heads;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + warp * 16 + g + 8 * i;
    if (r >= rows_total) continue;
    const int64_t row = (static_cast<int64_t>(b) * W + r / G) * p.heads + kvh * G + r % G;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    if (splits == 1) {
      const bool padding = row_bid[i] < 0;  // padding rows: zeros
      T* dst = static_cast<T*>(p.out) + row * D + 2 * t4;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(dst + j * 8) = padding ? 0u : pack2<T>(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
    } else {
      float* dst = ws_out + (split * total_rows + row) * D + 2 * t4;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if (t4 == 0) ws_lse[split * total_rows + row] = l[i] > 0.0f ? m[i] + log2f(l[i]) : -INFINITY;
    }
  }
}

// One warp per output row (b, token, head): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(AttentionParams p, int splits, const float* __restrict__ ws_out,
                   const float* __restrict__ ws_lse) {
  constexpr int kPerLane = D / 32;
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.window * p.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= total_rows) return;
  const int lane = threadIdx.x % 32;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ws_lse[s * total_rows + row]);
  float acc[kPerLane] = {};
  float wsum = 0.0f;
  // block_ids is [B, W] contiguous, so row / heads is its flat index.
  if (p.block_ids[row / p.heads] >= 0 && mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(ws_lse[s * total_rows + row] - mx);
      wsum += w;
      const float* src = ws_out + (s * total_rows + row) * D + lane;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[c] += w * src[c * 32];
    }
  }
  const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
  T* dst = static_cast<T*>(p.out) + row * D + lane;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) dst[c * 32] = from_float<T>(acc[c] * inv);
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, const AttentionMmaPlan& plan, float* workspace, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<D>();
  auto kernel = attention_mma_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  const int rows_total = p.window * (p.heads / p.kv_heads);
  const dim3 grid((rows_total + kRows - 1) / kRows, p.kv_heads, p.batch * plan.splits);
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.window * p.heads;
  float* lse = plan.splits > 1 ? workspace + plan.splits * total_rows * D : nullptr;
  kernel<<<grid, kThreads, bytes, stream>>>(p, plan.splits, plan.split_keys, workspace, lse);
  if (plan.splits == 1) return cudaSuccess;  // the caller checks the launch
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_kernel<T, D><<<static_cast<unsigned>((total_rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      p, plan.splits, workspace, lse);
  return cudaSuccess;
}

// SM count and compute capability per device, asked once.
constexpr int kMaxDevices = 64;
std::atomic<int> g_sm_count[kMaxDevices];  // 0: not asked yet
std::atomic<int> g_cc_major[kMaxDevices];

cudaError_t device_info(int* sm_count, int* cc_major) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev < kMaxDevices;
  if (cached && (*sm_count = g_sm_count[dev].load(std::memory_order_relaxed)) > 0) {
    *cc_major = g_cc_major[dev].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (cached) {
    g_cc_major[dev].store(*cc_major, std::memory_order_relaxed);
    g_sm_count[dev].store(*sm_count, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

}  // namespace

int attention_mma_plan(const AttentionParams& p, AttentionMmaPlan* plan) {
  *plan = AttentionMmaPlan{};
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.k_batch_stride, p.k_row_stride,
                             p.k_head_stride,  p.v_batch_stride, p.v_row_stride, p.v_head_stride};
  bool ok = (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) && (p.head_dim == 64 || p.head_dim == 128) &&
            aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_cache) && aligned16(p.v_cache) &&
            aligned16(p.out);
  for (int64_t s : strides) ok = ok && s % 8 == 0;  // 16-byte cp.async of every row
  if (!ok) return cudaSuccess;
  int sm_count = 0, cc_major = 0;
  const cudaError_t err = device_info(&sm_count, &cc_major);
  if (err != cudaSuccess) return err;
  if (cc_major < 8) return cudaSuccess;
  plan->supported = true;
  const int64_t row_tiles = (static_cast<int64_t>(p.window) * (p.heads / p.kv_heads) + kRows - 1) / kRows;
  const int64_t ctas = row_tiles * p.kv_heads * p.batch;
  int64_t splits = 1;
  if (ctas < sm_count) {
    splits = std::min<int64_t>({(sm_count + ctas - 1) / ctas, kMaxSplits, p.cache_capacity / kSplitMinKeys});
    splits = std::max<int64_t>(std::min<int64_t>(splits, kMaxGridZ / std::max(p.batch, 1)), 1);
  }
  plan->splits = static_cast<int>(splits);
  const int64_t chunk = (p.cache_capacity + splits - 1) / splits;
  plan->split_keys = static_cast<int>((chunk + kKeys - 1) / kKeys * kKeys);
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.window * p.heads;
  plan->workspace_floats = splits > 1 ? splits * total_rows * (p.head_dim + 1) : 0;
  return cudaSuccess;
}

int attention_mma_cuda(const AttentionParams& p, const AttentionMmaPlan& plan, float* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) {
    return bf16 ? launch<__nv_bfloat16, 64>(p, plan, workspace, s) : launch<__half, 64>(p, plan, workspace, s);
  }
  return bf16 ? launch<__nv_bfloat16, 128>(p, plan, workspace, s) : launch<__half, 128>(p, plan, workspace, s);
}

}  // namespace d2f
