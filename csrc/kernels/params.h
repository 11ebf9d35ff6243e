// Parameter structs shared by the CPU kernels, the CUDA kernels, the torch op layer and the
// C++ microbenchmarks. Nothing here may include torch: the kernels compile with nvcc/g++ alone.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define D2F_HOST_DEVICE __host__ __device__
#else
#define D2F_HOST_DEVICE
#endif

namespace d2f {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Block-causal attention of a window of new tokens over a KV cache plus the window itself.
// Window token i attends to every cached position of its row and to window token j iff
// block_ids[j] >= 0 && block_ids[j] <= block_ids[i]. Tokens with block_ids == -1 are padding:
// never attended to, and their output row is zero.
// Block ids must be non-decreasing over the non-padding tokens of a row (blocks are consecutive),
// which lets a kernel stop the key loop at the last key of the query tile's newest block.
struct AttentionParams {
  const void* q;  // [B, W, H, D]; last dim contiguous, other strides in elements
  const void* k;  // [B, W, Hkv, D]
  const void* v;  // [B, W, Hkv, D]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  const void* k_cache;  // [Bc, S, Hkv, D] contiguous
  const void* v_cache;  // [Bc, S, Hkv, D] contiguous
  const int32_t* cache_lens;  // [B]: cached positions of query row b (0..S)
  const int32_t* cache_rows;  // [B] or nullptr: query row b reads cache row cache_rows[b]
  const int32_t* block_ids;   // [B, W] contiguous
  void* out;                  // [B, W, H, D] contiguous
  int batch, window, heads, kv_heads, head_dim, cache_capacity;
  int cache_batch;  // rows of k_cache / v_cache (cache_rows index them)
  float scale;  // usually 1/sqrt(head_dim)
  DType dtype;  // of q, k, v, caches and out alike
};

// Copies window rows [src_start[b], src_start[b] + src_len[b]) of k/v into the cache of row b
// at positions [cache_lens[b], cache_lens[b] + src_len[b]).
struct StoreKVParams {
  const void* k;  // [B, W, Hkv, D], strides as in AttentionParams
  const void* v;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  void* k_cache;  // [Bc, S, Hkv, D] contiguous
  void* v_cache;
  const int32_t* cache_lens;  // [B] write offsets
  const int32_t* cache_rows;  // [B] or nullptr
  const int32_t* src_start;   // [B]
  const int32_t* src_len;     // [B]
  int batch, window, kv_heads, head_dim, cache_capacity;
  int cache_batch;  // rows of k_cache / v_cache (cache_rows index them)
  DType dtype;
};

// A linear layer (no bias) at a few rows: output[r, n] = sum_k input[r, k] * weight[n, k],
// float32. Each output is one thread's sum in a fixed order, so the result does not depend on
// the thread count. Meant for the few rows a decoding step runs on (the window's positions, the
// output head's read positions), where the layer is a pass over the whole weight matrix and BLAS
// runs well below memory speed.
struct LinearParams {
  const float* input;   // [R, K], rows input_stride apart, last dim contiguous
  const float* weight;  // [N, K] contiguous
  const float* bias;    // [N], added to each sum; nullptr for none
  float* output;        // [R, N] contiguous
  int64_t input_stride;
  int rows, in_features, out_features;
};

// A layer's norms and RoPE, float32 on the CPU. A decoding step runs them on its few window
// positions, where each is a few microseconds of work and the several ATen ops of its PyTorch form
// cost many times that in dispatch.

// RMSNorm of each row: output = weight * (input / sqrt(mean(input^2) + eps)), normalised and then
// scaled, as both reference models do.
struct RmsNormParams {
  const float* input;   // [R, D], rows input_stride apart, last dim contiguous
  const float* weight;  // [D]
  float* output;        // [R, D] contiguous
  int64_t input_stride;
  int rows, dim;
  float eps;
};

// Rotate-half rotary embedding of every head of every token: with h = D / 2,
// output[d] = input[d] * cos[d] - input[d + h] * sin[d] for d < h and
// output[d] = input[d] * cos[d] + input[d - h] * sin[d] from h on: the same products and sum as
// PyTorch's x * cos + cat(-x2, x1) * sin, so the same float32 result.
struct RopeParams {
  const float* input;  // [T, H, D]: tokens token_stride apart, heads head_stride apart, last dim contiguous
  const float* cos;    // [T, D] contiguous, shared by the heads
  const float* sin;    // [T, D] contiguous
  float* output;       // [T, H, D] contiguous
  int64_t token_stride, head_stride;
  int tokens, heads, head_dim;  // head_dim even
};

// How the forced single pick of a fully activated block ranks positions.
enum class Confidence : int32_t { kProbability = 0, kMargin = 1, kNegEntropy = 2 };

// Confidence-threshold unmasking over one forward's logits.
// For every window position w of row b with tokens[b, w] == mask_id and 0 <= block_ids[b, w] < NB
// (other ids, -1 = padding, are skipped):
//   row = prev_logits ? (w == 0 ? prev_logits[b] : logits[b, w - 1]) : logits[b, w]
//   x = row (temperature 0) or row / T (IEEE float division), NaN read as -inf
//   q_v = e_v / sum(e), e_v = x_v == max(x) ? 1 : exp(x_v - max(x)): the softmax, made total so
//         that +inf logits share probability 1 evenly and a row of -inf only is uniform
//   temperature == 0: token = argmax(x), temperature > 0: token = argmax(x + gumbel(seed, b, w, v));
//         the mask id is never the token; ties go to the lowest index; p = q_token
//   confidence = p | top1 - top2 of q | sum_v q_v * log(q_v + 1e-10); never NaN
// Then per block: decode every masked position with p > skip_threshold (strict); a block whose
// fully_activated flag is set and that decodes nothing decodes its masked position of highest
// confidence (lowest index on ties). Tokens are written in place.
struct UnmaskParams {
  const void* logits;  // [B, W, V]; last dim contiguous
  int64_t logits_batch_stride, logits_row_stride;
  const void* prev_logits;  // [B, V] or nullptr (then no shift)
  int64_t prev_batch_stride;
  int64_t* tokens;                  // [B, W] contiguous, in/out
  const int32_t* block_ids;         // [B, W] contiguous; global block index, -1 = skip
  const int32_t* fully_activated;   // [B, NB]; row stride given, last dim contiguous
  int64_t fully_activated_batch_stride;
  int32_t* counts;     // [B, NB] out: tokens newly decoded per block
  int32_t* eos_block;  // [B] out: lowest block in which eos_id was decoded, -1 if none
  // Workspace [B, W] each, filled per masked position before the per-block decision.
  int64_t* cand_token;
  float* cand_prob;
  float* cand_conf;
  int batch, window, vocab, num_blocks;
  int64_t mask_id, eos_id;  // eos_id < 0: no EOS tracking
  float skip_threshold, temperature;
  Confidence confidence;
  uint64_t seed;
  DType dtype;  // of logits and prev_logits
  // CUDA only: workspace of kUnmaskMaxSplits * kUnmaskPartialBytes bytes per (b, w), where the
  // CTAs that split one position's vocabulary leave their partial reductions.
  void* partials;
};

constexpr int kUnmaskMaxSplits = 32;
constexpr int kUnmaskPartialBytes = 48;

// Counter-based noise so that the CPU kernel, the CUDA kernel and the PyTorch reference draw
// identical Gumbel noise: uniform u in (0, 1) from (seed, b, w, v), all in 32-bit arithmetic.
// u has 24 significant bits, so it is exact in float32; the noise is -log(-log(u)) in float32
// (each implementation's logf, within an ulp of the others).
D2F_HOST_DEVICE inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

D2F_HOST_DEVICE inline uint32_t noise_key(uint64_t seed, uint32_t b, uint32_t w) {
  uint32_t h = hash32(static_cast<uint32_t>(seed) ^ hash32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9u));
  h = hash32(h ^ b);
  return hash32(h ^ w);
}

D2F_HOST_DEVICE inline float noise_uniform(uint32_t key, uint32_t v) {
  return (static_cast<float>(hash32(key ^ v) >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// The noise lies in [-log(-log(2^-24)), -log(-log(1 - 2^-24))] ~ [-2.82, 16.64]: a logit that
// is kGumbelBound or more below the best score so far cannot win, and its noise is not computed.
constexpr float kGumbelBound = 17.0f;

// D2F block-state pipeline (the spec steps: d2f_ext/pipeline.py), one row of a batch.
// Per row: rows[b, RowField]; per block: blocks[b, BlockField, NB] (field-major, so that one
// field of all blocks, e.g. kFullyActivated, is a contiguous [NB] vector the unmask kernel reads).
// Row coordinates are compact: block 0 is the row's real prompt (no padding) at [0, prompt_len),
// generation block k >= 1 starts at prompt_len + (k - 1) * block_size; the last one is shorter
// when kGenLen is not a multiple of the block size.
enum RowField : int32_t {
  kNumBlocks = 0,   // blocks that exist, the prompt included
  kEosBlock = 1,    // lowest block holding a decoded EOS, -1 if none
  kFinished = 2,    // 1 once the row needs no more forwards
  kCacheLen = 3,    // committed positions, counting the commit of the planned forward
  kWinStart = 4,    // planned forward: first window position (== cache length it reads)
  kWinLen = 5,      // planned forward: window length (0 when finished)
  kCommitLen = 6,   // planned forward: positions from kWinStart whose K/V it stores
  kForwards = 7,    // forwards planned so far
  kPromptLen = 8,
  kGenLen = 9,      // the row's generation budget (its max_new_tokens), set by the caller
  kNumRowFields = 10
};
enum BlockField : int32_t {
  kStart = 0,
  kLen = 1,
  kMasked = 2,  // positions still masked
  kState = 3,   // BlockState
  kFullyActivated = 4,    // sticky fully-activated flag
  kNumBlockFields = 5
};
enum BlockState : int32_t { kActive = 0, kToCache = 1, kInCache = 2 };

struct PipelineParams {
  int32_t* rows;    // [B, kNumRowFields] contiguous
  int32_t* blocks;  // [B, kNumBlockFields, NB] contiguous; NB >= 1 + the row's generation blocks
  const int32_t* counts;     // [B, NB]: decoded by the last forward (all zero before the first)
  const int32_t* eos_block;  // [B]: from the last unmask, -1 if none
  int batch, num_blocks, block_size;
  double block_add_threshold, decoded_token_threshold;
};

}  // namespace d2f
