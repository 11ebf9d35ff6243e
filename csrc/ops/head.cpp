// d2f_ext::head: checks and the output; the kernel does the work. CPU only: on a GPU the head at
// a few rows is a cuBLAS GEMV that already runs at memory speed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/kernels.h"
#include "ops/checks.h"

namespace {

namespace C = d2f::checks;
constexpr const char* kOp = "head";

at::Tensor head(const at::Tensor& hidden, const at::Tensor& weight) {
  C::check_dim(kOp, "hidden", hidden, 2, "[R, K]");
  C::check_dtype(kOp, "hidden", hidden, {at::kFloat});
  C::check_last_dim_contiguous(kOp, "hidden", hidden);
  C::check_dim(kOp, "weight", weight, 2, "[V, K]");
  C::check_dtype(kOp, "weight", weight, {at::kFloat});
  C::check_contiguous(kOp, "weight", weight);
  C::check_size(kOp, "weight", weight, 1, hidden.size(1), "hidden.size(1)");
  C::check_same_device(kOp, "weight", weight, "hidden", hidden);
  const int rows = C::checked_int(kOp, "hidden.size(0) (rows)", hidden.size(0));
  const int K = C::checked_int(kOp, "hidden.size(1) (hidden size)", hidden.size(1));
  const int V = C::checked_int(kOp, "weight.size(0) (vocabulary)", weight.size(0));
  at::Tensor logits = at::empty({rows, V}, hidden.options());
  if (rows == 0 || V == 0) return logits;
  d2f::HeadParams p{};
  p.hidden = hidden.data_ptr<float>();
  p.weight = weight.data_ptr<float>();
  p.logits = logits.data_ptr<float>();
  p.hidden_stride = hidden.stride(0);
  p.rows = rows;
  p.hidden_size = K;
  p.vocab = V;
  d2f::head_cpu(p);
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) { m.impl("head", &head); }
