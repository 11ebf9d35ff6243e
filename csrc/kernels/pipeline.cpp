#include "kernels.h"
#include "pipeline_row.h"

namespace d2f {

// Rows are independent and each costs O(NB): a plain loop beats thread start-up at any batch.
void pipeline_step_cpu(const PipelineParams& p) {
  const int64_t row_blocks = static_cast<int64_t>(kNumBlockFields) * p.num_blocks;
  for (int b = 0; b < p.batch; ++b) {
    pipeline_row(p.rows + static_cast<int64_t>(b) * kNumRowFields, p.blocks + b * row_blocks,
                 p.counts + static_cast<int64_t>(b) * p.num_blocks, p.eos_block[b], p.num_blocks,
                 p.block_size, p.block_add_threshold, p.decoded_token_threshold);
  }
}

}  // namespace d2f
