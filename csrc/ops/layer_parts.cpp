// d2f_ext::rms_norm and d2f_ext::rope: checks and the outputs; the kernels do the work. CPU only,
// float32: on a GPU, or in a model of another dtype, d2f_ext.ops runs their PyTorch form instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/kernels.h"
#include "ops/checks.h"

namespace {

namespace C = d2f::checks;

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  constexpr const char* kOp = "rms_norm";
  C::check_dtype(kOp, "input", input, {at::kFloat});
  TORCH_CHECK(input.dim() >= 1, kOp, ": input must have at least 1 dimension, got a scalar");
  C::check_dim(kOp, "weight", weight, 1, "[D]");
  C::check_dtype(kOp, "weight", weight, {at::kFloat});
  C::check_contiguous(kOp, "weight", weight);
  C::check_size(kOp, "weight", weight, 0, input.size(-1), "input.size(-1)");
  C::check_same_device(kOp, "weight", weight, "input", input);
  at::Tensor output = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return output;
  const int64_t D = input.size(-1);
  at::Tensor rows = input.reshape({-1, D});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  d2f::RmsNormParams p{};
  p.input = rows.data_ptr<float>();
  p.weight = weight.data_ptr<float>();
  p.output = output.data_ptr<float>();
  p.input_stride = rows.stride(0);
  p.rows = C::checked_int(kOp, "input rows", rows.size(0));
  p.dim = C::checked_int(kOp, "input.size(-1)", D);
  p.eps = static_cast<float>(eps);
  d2f::rms_norm_cpu(p);
  return output;
}

at::Tensor rope(const at::Tensor& input, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rope";
  C::check_dim(kOp, "input", input, 4, "[B, L, H, D]");
  C::check_dtype(kOp, "input", input, {at::kFloat});
  const int64_t B = input.size(0), L = input.size(1), H = input.size(2), D = input.size(3);
  TORCH_CHECK(D % 2 == 0, kOp, ": input.size(3) (head_dim) must be even, got ", D);
  const auto check_table = [&](const char* name, const at::Tensor& t) {
    C::check_dim(kOp, name, t, 4, "[B, L, 1, D]");
    C::check_dtype(kOp, name, t, {at::kFloat});
    C::check_contiguous(kOp, name, t);
    C::check_size(kOp, name, t, 0, B, "input.size(0)");
    C::check_size(kOp, name, t, 1, L, "input.size(1)");
    C::check_size(kOp, name, t, 2, 1, "1");
    C::check_size(kOp, name, t, 3, D, "input.size(3)");
    C::check_same_device(kOp, name, t, "input", input);
  };
  check_table("cos", cos);
  check_table("sin", sin);
  at::Tensor tokens = input.reshape({B * L, H, D});
  if (tokens.numel() > 0 && tokens.stride(2) != 1) tokens = tokens.contiguous();
  at::Tensor output = at::empty({B, L, H, D}, input.options());
  if (tokens.numel() == 0) return output;
  d2f::RopeParams p{};
  p.input = tokens.data_ptr<float>();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.output = output.data_ptr<float>();
  p.token_stride = tokens.stride(0);
  p.head_stride = tokens.stride(1);
  p.tokens = C::checked_int(kOp, "input.size(0) * input.size(1) (tokens)", B * L);
  p.heads = C::checked_int(kOp, "input.size(2) (heads)", H);
  p.head_dim = C::checked_int(kOp, "input.size(3) (head_dim)", D);
  d2f::rope_cpu(p);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
