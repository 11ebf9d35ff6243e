// d2f_ext::unmask: checks, workspace and outputs; the kernels do the work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <tuple>

#include "kernels/kernels.h"
#include "ops/checks.h"

#if defined(D2F_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

namespace C = d2f::checks;
constexpr const char* kOp = "unmask";

std::tuple<at::Tensor, at::Tensor> unmask(const at::Tensor& logits, const at::Tensor& tokens,
                                          const at::Tensor& block_ids, const at::Tensor& fully_activated,
                                          const std::optional<at::Tensor>& prev_logits, int64_t mask_id,
                                          int64_t eos_id, double skip_threshold, double temperature,
                                          int64_t confidence, int64_t seed) {
  C::check_dim(kOp, "logits", logits, 3, "[B, W, V]");
  // The CPU kernel converts float16 too, so unlike the other ops it is accepted on every device.
  C::check_dtype(kOp, "logits", logits, {at::kFloat, at::kBFloat16, at::kHalf});
  C::check_last_dim_contiguous(kOp, "logits", logits);
  const int64_t B = logits.size(0), W = logits.size(1), V = logits.size(2);
  C::checked_int(kOp, "logits.size(1) (window)", W);
  C::checked_int(kOp, "logits.size(2) (vocabulary)", V);
  C::check_dim(kOp, "tokens", tokens, 2, "[B, W]");
  C::check_dtype(kOp, "tokens", tokens, {at::kLong});
  C::check_size(kOp, "tokens", tokens, 0, B, "logits.size(0)");
  C::check_size(kOp, "tokens", tokens, 1, W, "logits.size(1)");
  C::check_contiguous(kOp, "tokens", tokens);
  C::check_dim(kOp, "block_ids", block_ids, 2, "[B, W]");
  C::check_dtype(kOp, "block_ids", block_ids, {at::kInt});
  C::check_size(kOp, "block_ids", block_ids, 0, B, "logits.size(0)");
  C::check_size(kOp, "block_ids", block_ids, 1, W, "logits.size(1)");
  C::check_contiguous(kOp, "block_ids", block_ids);
  C::check_dim(kOp, "fully_activated", fully_activated, 2, "[B, NB]");
  C::check_dtype(kOp, "fully_activated", fully_activated, {at::kInt});
  C::check_size(kOp, "fully_activated", fully_activated, 0, B, "logits.size(0)");
  C::check_last_dim_contiguous(kOp, "fully_activated", fully_activated);
  const int64_t NB = C::checked_int(kOp, "fully_activated.size(1) (blocks)", fully_activated.size(1));
  C::check_same_device(kOp, "tokens", tokens, "logits", logits);
  C::check_same_device(kOp, "block_ids", block_ids, "logits", logits);
  C::check_same_device(kOp, "fully_activated", fully_activated, "logits", logits);
  if (prev_logits) {
    const at::Tensor& prev = *prev_logits;
    C::check_dim(kOp, "prev_logits", prev, 2, "[B, V]");
    C::check_size(kOp, "prev_logits", prev, 0, B, "logits.size(0)");
    C::check_size(kOp, "prev_logits", prev, 1, V, "logits.size(2)");
    C::check_same_dtype(kOp, "prev_logits", prev, "logits", logits);
    C::check_last_dim_contiguous(kOp, "prev_logits", prev);
    C::check_same_device(kOp, "prev_logits", prev, "logits", logits);
  }
  TORCH_CHECK(mask_id >= 0 && mask_id < V, "unmask: mask_id must be in [0, ", V, "), got ", mask_id);
  TORCH_CHECK(eos_id < V, "unmask: eos_id must be < the vocabulary size ", V, " (negative: none), got ", eos_id);
  TORCH_CHECK(skip_threshold >= 0.0 && skip_threshold <= 1.0, "unmask: skip_threshold must be in [0, 1], got ", skip_threshold);
  // The kernels compute in float: a temperature float cannot hold would turn greedy or flat.
  TORCH_CHECK(temperature == 0.0 || (temperature >= FLT_MIN && temperature <= FLT_MAX),
              "unmask: temperature must be 0 or in [", FLT_MIN, ", ", FLT_MAX, "], got ", temperature);
  TORCH_CHECK(confidence >= 0 && confidence <= 2,
              "unmask: confidence must be 0 (probability), 1 (margin) or 2 (neg_entropy), got ", confidence);
  if (block_ids.numel() > 0 && C::value_checks_on(block_ids)) {
    // Outside debug mode the kernels skip positions whose id is outside [0, NB), as padding.
    const auto [lo, hi] = at::aminmax(block_ids);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < NB, "unmask: block_ids must be in [-1, NB = ", NB,
                ") (NB = fully_activated.size(1)), got values in [", lo_v, ", ", hi_v, "]");
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
  p.skip_threshold = static_cast<float>(skip_threshold);
  p.temperature = static_cast<float>(temperature);
  p.confidence = static_cast<d2f::Confidence>(confidence);
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = C::kernel_dtype(logits.scalar_type());

  if (logits.is_cpu()) {
    d2f::unmask_cpu(p);
  } else {
#if defined(D2F_WITH_CUDA)
    C::check_grid_size(kOp, "logits.size(0) (batch)", B), C::check_grid_size(kOp, "logits.size(1) (window)", W);
    const c10::cuda::CUDAGuard guard(logits.device());
    const at::Tensor partials =
        at::empty({B * W * d2f::kUnmaskMaxSplits * d2f::kUnmaskPartialBytes}, logits.options().dtype(at::kByte));
    p.partials = partials.data_ptr();
    d2f::unmask_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
