// Entry points of the torch-free kernels. The op layer (csrc/ops) and the C++ benchmarks
// (csrc/bench) call these; each validates nothing: callers check shapes and ranges first.
#pragma once
#include "params.h"

namespace d2f {

// Whether `ptr` allows 16-byte vector accesses (the CUDA kernels' fast paths).
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void attention_cpu(const AttentionParams& p);
void store_kv_cpu(const StoreKVParams& p);
void unmask_cpu(const UnmaskParams& p);
void pipeline_step_cpu(const PipelineParams& p);
void linear_cpu(const LinearParams& p);
void rms_norm_cpu(const RmsNormParams& p);
void rope_cpu(const RopeParams& p);

#if defined(D2F_WITH_CUDA)
// `stream` is a cudaStream_t and an int result a cudaError_t, kept opaque so that this header
// needs no CUDA include. A non-zero result is a failure before the launch; the caller checks the
// launch itself (cudaGetLastError).
int attention_cuda(const AttentionParams& p, void* stream);

// The tensor-core attention kernel (attention_mma_cuda.cu): how it would run p on the current
// device. Unsupported (the caller uses attention_cuda) unless bf16/fp16, head_dim 64 or 128,
// q/k/v/caches/out 16-byte aligned with strides of whole 16-byte rows, and sm_80 or newer.
struct AttentionMmaPlan {
  bool supported;
  int splits;               // KV splits (1: no split-KV)
  int split_keys;           // cache positions per split
  int64_t workspace_floats;  // fp32 workspace attention_mma_cuda needs (0 when splits == 1)
};
int attention_mma_plan(const AttentionParams& p, AttentionMmaPlan* plan);
int attention_mma_cuda(const AttentionParams& p, const AttentionMmaPlan& plan, float* workspace, void* stream);
void store_kv_cuda(const StoreKVParams& p, void* stream);
void unmask_cuda(const UnmaskParams& p, void* stream);
void pipeline_step_cuda(const PipelineParams& p, void* stream);
#endif

}  // namespace d2f
