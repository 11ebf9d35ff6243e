// d2f_ext::unmask: checks, workspace and outputs; the kernels do the work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "kernels/kernels.h"

#if defined(D2F_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), "unmask: ", name, " must be on ", logits.device(),
              " like logits, got ", t.device());
}

d2f::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return d2f::DType::kFloat32;
    case at::kBFloat16:
      return d2f::DType::kBFloat16;
    case at::kHalf:
      return d2f::DType::kFloat16;
    default:
      TORCH_CHECK(false, "unmask: logits must be float32, bfloat16 or float16, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> unmask(const at::Tensor& logits, const at::Tensor& tokens,
                                          const at::Tensor& block_ids, const at::Tensor& fully_activated,
                                          const std::optional<at::Tensor>& prev_logits, int64_t mask_id,
                                          int64_t eos_id, double threshold, double temperature,
                                          int64_t confidence, int64_t seed) {
  TORCH_CHECK(logits.dim() == 3, "unmask: logits must be 3-D [B, W, V], got ", logits.dim(), "-D");
  const d2f::DType dtype = kernel_dtype(logits.scalar_type());
  const int64_t B = logits.size(0), W = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V > 0 && V < INT32_MAX && W < INT32_MAX, "unmask: logits vocabulary and window must fit int32, got W=",
              W, " V=", V);
  TORCH_CHECK(logits.stride(2) == 1, "unmask: logits must have a contiguous last dim");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == B && tokens.size(1) == W,
              "unmask: tokens must be [B, W] = [", B, ", ", W, "], got ", tokens.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "unmask: tokens must be int64, got ", tokens.scalar_type());
  TORCH_CHECK(tokens.is_contiguous(), "unmask: tokens must be contiguous");
  TORCH_CHECK(block_ids.dim() == 2 && block_ids.size(0) == B && block_ids.size(1) == W,
              "unmask: block_ids must be [B, W] = [", B, ", ", W, "], got ", block_ids.sizes());
  TORCH_CHECK(block_ids.scalar_type() == at::kInt, "unmask: block_ids must be int32, got ",
              block_ids.scalar_type());
  TORCH_CHECK(block_ids.is_contiguous(), "unmask: block_ids must be contiguous");
  TORCH_CHECK(fully_activated.dim() == 2 && fully_activated.size(0) == B,
              "unmask: fully_activated must be [B, NB] with B = ", B, ", got ", fully_activated.sizes());
  TORCH_CHECK(fully_activated.scalar_type() == at::kInt, "unmask: fully_activated must be int32, got ",
              fully_activated.scalar_type());
  const int64_t NB = fully_activated.size(1);
  TORCH_CHECK(fully_activated.stride(1) == 1 || NB <= 1, "unmask: fully_activated must have a contiguous last dim");
  check_same_device(tokens, logits, "tokens");
  check_same_device(block_ids, logits, "block_ids");
  check_same_device(fully_activated, logits, "fully_activated");
  if (prev_logits) {
    const at::Tensor& prev = *prev_logits;
    TORCH_CHECK(prev.dim() == 2 && prev.size(0) == B && prev.size(1) == V,
                "unmask: prev_logits must be [B, V] = [", B, ", ", V, "], got ", prev.sizes());
    TORCH_CHECK(prev.scalar_type() == logits.scalar_type(), "unmask: prev_logits must have logits' dtype ",
                logits.scalar_type(), ", got ", prev.scalar_type());
    TORCH_CHECK(prev.stride(1) == 1, "unmask: prev_logits must have a contiguous last dim");
    check_same_device(prev, logits, "prev_logits");
  }
  TORCH_CHECK(mask_id >= 0 && mask_id < V, "unmask: mask_id must be in [0, ", V, "), got ", mask_id);
  TORCH_CHECK(eos_id < V, "unmask: eos_id must be < vocabulary size ", V, " (negative: none), got ", eos_id);
  TORCH_CHECK(threshold >= 0.0 && threshold <= 1.0, "unmask: threshold must be in [0, 1], got ", threshold);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "unmask: temperature must be finite and >= 0, got ", temperature);
  TORCH_CHECK(confidence >= 0 && confidence <= 2,
              "unmask: confidence must be 0 (probability), 1 (margin) or 2 (neg_entropy), got ", confidence);
  if (block_ids.numel() > 0) {
    // A device-to-host copy on CUDA; the bound keeps the kernels' counts writes in range.
    const auto [lo, hi] = at::aminmax(block_ids);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < NB, "unmask: block_ids must be in [-1, NB = ", NB,
                ") (fully_activated's second dim), got values in [", lo_v, ", ", hi_v, "]");
  }

  const auto int_opts = block_ids.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({B, NB}, int_opts);
  at::Tensor eos_block = at::full({B}, -1, int_opts);
  if (B == 0 || W == 0) return {counts, eos_block};
  at::Tensor cand_token = at::empty({B, W}, tokens.options());
  at::Tensor cand_prob = at::empty({B, W}, int_opts.dtype(at::kFloat));
  at::Tensor cand_conf = at::empty({B, W}, int_opts.dtype(at::kFloat));

  d2f::UnmaskParams p{};
  p.logits = logits.data_ptr();
  p.logits_batch_stride = logits.stride(0);
  p.logits_row_stride = logits.stride(1);
  p.prev_logits = prev_logits ? prev_logits->data_ptr() : nullptr;
  p.prev_batch_stride = prev_logits ? prev_logits->stride(0) : 0;
  p.tokens = tokens.data_ptr<int64_t>();
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.fully_activated = fully_activated.data_ptr<int32_t>();
  p.fully_activated_batch_stride = fully_activated.stride(0);
  p.counts = counts.data_ptr<int32_t>();
  p.eos_block = eos_block.data_ptr<int32_t>();
  p.cand_token = cand_token.data_ptr<int64_t>();
  p.cand_prob = cand_prob.data_ptr<float>();
  p.cand_conf = cand_conf.data_ptr<float>();
  p.batch = static_cast<int>(B);
  p.window = static_cast<int>(W);
  p.vocab = static_cast<int>(V);
  p.num_blocks = static_cast<int>(NB);
  p.mask_id = mask_id;
  p.eos_id = eos_id;
  p.threshold = static_cast<float>(threshold);
  p.temperature = static_cast<float>(temperature);
  p.confidence = static_cast<d2f::Confidence>(confidence);
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = dtype;

  if (logits.is_cpu()) {
    d2f::unmask_cpu(p);
  } else {
#if defined(D2F_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(logits.device());
    d2f::unmask_cuda(p, at::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "unmask: logits on ", logits.device(), " but d2f_ext was built without CUDA");
#endif
  }
  return {counts, eos_block};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) { m.impl("unmask", &unmask); }

#if defined(D2F_WITH_CUDA)
TORCH_LIBRARY_IMPL(d2f_ext, CUDA, m) { m.impl("unmask", &unmask); }
#endif
