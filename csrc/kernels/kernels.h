// Entry points of the torch-free kernels. The op layer (csrc/ops) and the C++ benchmarks
// (csrc/bench) call these; each validates nothing: callers check shapes and ranges first.
#pragma once
#include "params.h"

namespace d2f {

void attention_cpu(const AttentionParams& p);
void store_kv_cpu(const StoreKVParams& p);
void unmask_cpu(const UnmaskParams& p);
void pipeline_step_cpu(const PipelineParams& p);

#if defined(D2F_WITH_CUDA)
// `stream` is a cudaStream_t; kept opaque so that this header needs no CUDA include.
void attention_cuda(const AttentionParams& p, void* stream);
void store_kv_cuda(const StoreKVParams& p, void* stream);
void unmask_cuda(const UnmaskParams& p, void* stream);
void pipeline_step_cuda(const PipelineParams& p, void* stream);
#endif

}  // namespace d2f
