// torch op `d2f_ext::pipeline_step` over one batch's pipeline state tensors (layout:
// csrc/kernels/params.h; d2f_ext.pipeline.init_rows makes a row's initial state).
#include <torch/library.h>

#include <ATen/ATen.h>

#if defined(D2F_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "kernels/kernels.h"
#include "ops/checks.h"

namespace {

void check_int32(const at::Tensor& t, const char* name, const char* shape, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "pipeline_step: ", name, " must be ", dim, "-D ", shape, ", got ",
              t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt, "pipeline_step: ", name, " must be int32, got ",
              t.scalar_type());
}

void check_threshold(double v, const char* name) {
  TORCH_CHECK(v >= 0.0 && v <= 1.0, "pipeline_step: ", name, " must be in [0, 1], got ", v);
}

// The state must be one init_rows made and pipeline_step advanced; a bad one (e.g. counts larger than the
// masks left) would otherwise corrupt the row silently. Cheap on the CPU, so always checked there.
void check_state_cpu(const at::Tensor& rows, const at::Tensor& blocks, const at::Tensor& counts) {
  const int64_t B = rows.size(0), NB = blocks.size(2);
  const int32_t* r = rows.data_ptr<int32_t>();
  const int32_t* bl = blocks.data_ptr<int32_t>();
  const int32_t* c = counts.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* row = r + b * d2f::kNumRowFields;
    if (row[d2f::kFinished]) continue;
    const int32_t n = row[d2f::kNumBlocks];
    TORCH_CHECK(n >= 1 && n <= NB, "pipeline_step: rows[", b, ", NUM_BLOCKS] must be in [1, NB = ", NB,
                "], got ", n);
    const int32_t* len = bl + (b * d2f::kNumBlockFields + d2f::kLen) * NB;
    const int32_t* masked = bl + (b * d2f::kNumBlockFields + d2f::kMasked) * NB;
    for (int32_t i = 0; i < n; ++i) {
      TORCH_CHECK(len[i] > 0, "pipeline_step: blocks[", b, ", LEN, ", i, "] must be > 0, got ", len[i]);
      const int32_t k = c[b * NB + i];
      TORCH_CHECK(k >= 0 && k <= masked[i], "pipeline_step: counts[", b, ", ", i, "] = ", k,
                  " must be in [0, masked positions left = ", masked[i], "]");
    }
  }
}

void pipeline_step(const at::Tensor& rows, const at::Tensor& blocks, const at::Tensor& counts,
                   const at::Tensor& eos_block, int64_t block_size, double block_add_threshold,
                   double decoded_token_threshold) {
  check_int32(rows, "rows", "[B, NUM_ROW_FIELDS]", 2);
  check_int32(blocks, "blocks", "[B, 5, NB]", 3);
  check_int32(counts, "counts", "[B, NB]", 2);
  check_int32(eos_block, "eos_block", "[B]", 1);
  const int64_t B = rows.size(0), NB = blocks.size(2);
  TORCH_CHECK(rows.size(1) == d2f::kNumRowFields, "pipeline_step: rows must be [B, ",
              int(d2f::kNumRowFields), "], got ", rows.sizes());
  TORCH_CHECK(blocks.size(0) == B && blocks.size(1) == d2f::kNumBlockFields && NB >= 1,
              "pipeline_step: blocks must be [B, ", int(d2f::kNumBlockFields),
              ", NB] with B = rows.size(0) = ", B, " and NB >= 1, got ", blocks.sizes());
  TORCH_CHECK(counts.size(0) == B && counts.size(1) == NB, "pipeline_step: counts must be [B, NB] = [",
              B, ", ", NB, "], got ", counts.sizes());
  TORCH_CHECK(eos_block.size(0) == B, "pipeline_step: eos_block must be [B] = [", B, "], got ",
              eos_block.sizes());
  // The state is updated in place, so a copy made here would silently drop the update.
  TORCH_CHECK(rows.is_contiguous(), "pipeline_step: rows must be contiguous");
  TORCH_CHECK(blocks.is_contiguous(), "pipeline_step: blocks must be contiguous");
  TORCH_CHECK(blocks.device() == rows.device() && counts.device() == rows.device() &&
                  eos_block.device() == rows.device(),
              "pipeline_step: rows, blocks, counts and eos_block must be on one device, got ",
              rows.device(), ", ", blocks.device(), ", ", counts.device(), ", ", eos_block.device());
  TORCH_CHECK(block_size > 0, "pipeline_step: block_size must be > 0, got ", block_size);
  check_threshold(block_add_threshold, "block_add_threshold");
  check_threshold(decoded_token_threshold, "decoded_token_threshold");
  TORCH_CHECK(B <= INT32_MAX && NB <= INT32_MAX && block_size <= INT32_MAX,
              "pipeline_step: rows, blocks or block_size too large for int32 indexing");

  const at::Tensor counts_c = counts.contiguous();
  const at::Tensor eos_c = eos_block.contiguous();
  d2f::PipelineParams p{};
  p.rows = rows.data_ptr<int32_t>();
  p.blocks = blocks.data_ptr<int32_t>();
  p.counts = counts_c.data_ptr<int32_t>();
  p.eos_block = eos_c.data_ptr<int32_t>();
  p.batch = static_cast<int>(B);
  p.num_blocks = static_cast<int>(NB);
  p.block_size = static_cast<int>(block_size);
  p.block_add_threshold = block_add_threshold;
  p.decoded_token_threshold = decoded_token_threshold;
  if (rows.is_cpu()) {
    check_state_cpu(rows, blocks, counts_c);
    d2f::pipeline_step_cpu(p);
    return;
  }
#if defined(D2F_WITH_CUDA)
  TORCH_CHECK(rows.is_cuda(), "pipeline_step: rows must be on CPU or CUDA, got ", rows.device());
  // On the GPU the check reads the state back (a sync per step), so only in debug mode.
  if (d2f::checks::value_checks_on(rows)) check_state_cpu(rows.cpu(), blocks.cpu(), counts_c.cpu());
  const c10::cuda::CUDAGuard guard(rows.device());
  d2f::pipeline_step_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "pipeline_step: rows must be on CPU (built without CUDA), got ", rows.device());
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) { m.impl("pipeline_step", &pipeline_step); }

#if defined(D2F_WITH_CUDA)
TORCH_LIBRARY_IMPL(d2f_ext, CUDA, m) { m.impl("pipeline_step", &pipeline_step); }
#endif
