// d2f_ext::linear: checks and the output; the kernel does the work. CPU only: on a GPU a linear
// layer at a few rows is a cuBLAS GEMV that already runs at memory speed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/kernels.h"
#include "ops/checks.h"

namespace {

namespace C = d2f::checks;
constexpr const char* kOp = "linear";

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  C::check_dim(kOp, "input", input, 2, "[R, K]");
  C::check_dtype(kOp, "input", input, {at::kFloat});
  C::check_last_dim_contiguous(kOp, "input", input);
  C::check_dim(kOp, "weight", weight, 2, "[N, K]");
  C::check_dtype(kOp, "weight", weight, {at::kFloat});
  C::check_contiguous(kOp, "weight", weight);
  C::check_size(kOp, "weight", weight, 1, input.size(1), "input.size(1)");
  C::check_same_device(kOp, "weight", weight, "input", input);
  if (bias) {
    C::check_dim(kOp, "bias", *bias, 1, "[N]");
    C::check_dtype(kOp, "bias", *bias, {at::kFloat});
    C::check_contiguous(kOp, "bias", *bias);
    C::check_size(kOp, "bias", *bias, 0, weight.size(0), "weight.size(0)");
    C::check_same_device(kOp, "bias", *bias, "input", input);
  }
  const int rows = C::checked_int(kOp, "input.size(0) (rows)", input.size(0));
  const int K = C::checked_int(kOp, "input.size(1) (in features)", input.size(1));
  const int N = C::checked_int(kOp, "weight.size(0) (out features)", weight.size(0));
  at::Tensor output = at::empty({rows, N}, input.options());
  if (rows == 0 || N == 0) return output;
  d2f::LinearParams p{};
  p.input = input.data_ptr<float>();
  p.weight = weight.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.output = output.data_ptr<float>();
  p.input_stride = input.stride(0);
  p.rows = rows;
  p.in_features = K;
  p.out_features = N;
  d2f::linear_cpu(p);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) { m.impl("linear", &linear); }
