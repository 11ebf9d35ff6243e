#include <cuda_runtime.h>

#include "kernels.h"
#include "pipeline_row.h"

namespace d2f {
namespace {

// One thread per row: the state stays on the GPU, so a decode step needs no host round trip.
__global__ void pipeline_step_kernel(PipelineParams p) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  const int64_t row_blocks = static_cast<int64_t>(kNumBlockFields) * p.num_blocks;
  pipeline_row(p.rows + static_cast<int64_t>(b) * kNumRowFields, p.blocks + b * row_blocks,
               p.counts + static_cast<int64_t>(b) * p.num_blocks, p.eos_block[b], p.num_blocks,
               p.block_size, p.block_add_threshold, p.decoded_token_threshold);
}

}  // namespace

void pipeline_step_cuda(const PipelineParams& p, void* stream) {
  if (p.batch == 0) return;
  constexpr int kThreads = 128;
  const int grid = (p.batch + kThreads - 1) / kThreads;
  pipeline_step_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
}

}  // namespace d2f
