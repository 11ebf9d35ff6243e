// Torch op layer of d2f_ext::attention and d2f_ext::store_kv: argument checks, then the kernels.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "kernels/kernels.h"
#include "ops/bounds.h"
#include "ops/checks.h"

#if defined(D2F_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace d2f {
namespace {

using namespace checks;

constexpr int kMaxHeadDim = 256;

void check_head_dim(const char* op, int64_t d) {
  TORCH_CHECK(d > 0 && d % 8 == 0 && d <= kMaxHeadDim, op, ": head_dim (last dim of q/k/v) must be a multiple of 8 in [8, ",
              kMaxHeadDim, "], got ", d);
}

// Window k/v [B, W, Hkv, D] with the same shape, dtype and device as `ref_name`'s expectations.
void check_window_kv(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                     int64_t B, int64_t W, int64_t D) {
  check_dim(op, name, t, 4, "[B, W, Hkv, D]");
  check_same_device(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  check_size(op, name, t, 0, B, "the batch size");
  check_size(op, name, t, 1, W, "the window length");
  check_size(op, name, t, 3, D, "head_dim");
  check_last_dim_contiguous(op, name, t);
}

void check_cache(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                 int64_t Hkv, int64_t D) {
  check_dim(op, name, t, 4, "[Bc, S, Hkv, D]");
  check_same_device(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  check_size(op, name, t, 2, Hkv, "the kv heads of k");
  check_size(op, name, t, 3, D, "head_dim");
  check_contiguous(op, name, t);
}

std::optional<at::Tensor> check_cache_rows(const char* op, const std::optional<at::Tensor>& cache_rows,
                                           const char* ref_name, const at::Tensor& ref, int64_t B, int64_t Bc) {
  if (!cache_rows.has_value()) return std::nullopt;
  check_same_device(op, "cache_rows", *cache_rows, ref_name, ref);
  check_int_range(op, "cache_rows", *cache_rows, B, 0, Bc - 1);
  return cache_rows->contiguous();
}

// block_ids: int32 [B, W], values >= -1, non-decreasing over each row's non-padding tokens (the
// kernels' tile skipping relies on it).
void check_block_ids(const char* op, const at::Tensor& block_ids, const at::Tensor& ref, int64_t B, int64_t W) {
  check_dim(op, "block_ids", block_ids, 2, "[B, W]");
  check_same_device(op, "block_ids", block_ids, "q", ref);
  check_dtype(op, "block_ids", block_ids, {at::kInt});
  check_size(op, "block_ids", block_ids, 0, B, "the batch size");
  check_size(op, "block_ids", block_ids, 1, W, "the window length");
  check_contiguous(op, "block_ids", block_ids);
  if (!value_checks_on(block_ids)) return;
  at::Tensor host = block_ids.cpu();
  const int32_t* bid = host.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    int32_t last = -1;
    for (int64_t w = 0; w < W; ++w) {
      const int32_t x = bid[b * W + w];
      TORCH_CHECK(x >= -1, op, ": block_ids must be >= -1 (-1 = padding), got ", x, " at [", b, ", ", w, "]");
      if (x < 0) continue;
      TORCH_CHECK(x >= last, op, ": block_ids must be non-decreasing over the non-padding tokens of a row, got ",
                  x, " after ", last, " in row ", b);
      last = x;
    }
  }
}

enum class AttentionKernel { kSimt, kMma };

AttentionKernel parse_kernel(const char* op, const char* what, c10::string_view name) {
  if (name == "simt") return AttentionKernel::kSimt;
  if (name == "mma") return AttentionKernel::kMma;
  TORCH_CHECK(false, op, ": ", what, " must be \"simt\" or \"mma\", got \"", std::string(name), "\"");
}

// The CUDA kernel of a call that names none: D2F_EXT_ATTENTION, read on the first such call only,
// so that a process runs one kernel throughout (a CUDA graph captured before a change of the
// variable would keep the old kernel anyway).
AttentionKernel default_kernel(const char* op) {
  static const AttentionKernel kernel = [op] {
    const char* env = std::getenv("D2F_EXT_ATTENTION");
    if (env == nullptr || *env == '\0') return AttentionKernel::kSimt;
    return parse_kernel(op, "the D2F_EXT_ATTENTION environment variable", env);
  }();
  return kernel;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& block_ids,
                     const std::optional<at::Tensor>& cache_rows, double scale,
                     const std::optional<c10::string_view>& kernel) {
  const char* op = "attention";
  [[maybe_unused]] const AttentionKernel choice =
      kernel.has_value() ? parse_kernel(op, "kernel", *kernel) : default_kernel(op);
  check_dim(op, "q", q, 4, "[B, W, H, D]");
  check_float_dtype(op, "q", q);
  check_last_dim_contiguous(op, "q", q);
  const int64_t B = q.size(0), W = q.size(1), H = q.size(2), D = q.size(3);
  check_head_dim(op, D);
  check_window_kv(op, "k", k, q, "q", B, W, D);
  check_window_kv(op, "v", v, q, "q", B, W, D);
  const int64_t Hkv = k.size(2);
  check_size(op, "v", v, 2, Hkv, "the kv heads of k");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": the heads of q (", H, ") must be a multiple of the kv heads of k (",
              Hkv, ")");
  check_cache(op, "k_cache", k_cache, q, "q", Hkv, D);
  check_cache(op, "v_cache", v_cache, q, "q", Hkv, D);
  const int64_t Bc = k_cache.size(0), S = k_cache.size(1);
  check_size(op, "v_cache", v_cache, 0, Bc, "the rows of k_cache");
  check_size(op, "v_cache", v_cache, 1, S, "the capacity of k_cache");
  check_same_device(op, "cache_lens", cache_lens, "q", q);
  check_int_range(op, "cache_lens", cache_lens, B, 0, S);
  check_block_ids(op, block_ids, q, B, W);
  TORCH_CHECK(cache_rows.has_value() || B <= Bc, op, ": without cache_rows, k_cache needs at least B = ", B,
              " rows, got ", Bc);
  const std::optional<at::Tensor> rows = check_cache_rows(op, cache_rows, "q", q, B, Bc);

  at::Tensor out = at::empty({B, W, H, D}, q.options());
  if (out.numel() == 0) return out;
  const bounds::CacheIndex index = q.is_cuda() ? bounds::CacheIndex{cache_lens.contiguous(), rows}
                                               : bounds::clamp_cache_index_cpu(cache_lens, rows, S, Bc);
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_lens = index.lens.data_ptr<int32_t>();
  p.cache_rows = index.rows ? index.rows->data_ptr<int32_t>() : nullptr;
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.batch = checked_int(op, "B", B), p.window = checked_int(op, "W", W), p.heads = checked_int(op, "H", H);
  p.kv_heads = checked_int(op, "Hkv", Hkv), p.head_dim = checked_int(op, "D", D);
  p.cache_capacity = checked_int(op, "S", S), p.cache_batch = checked_int(op, "Bc", Bc);
  p.scale = static_cast<float>(scale);
  p.dtype = kernel_dtype(q.scalar_type());
#if defined(D2F_WITH_CUDA)
  if (q.is_cuda()) {
    check_grid_size(op, "B", B), check_grid_size(op, "Hkv", Hkv);
    c10::cuda::CUDAGuard guard(q.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    if (choice == AttentionKernel::kMma) {
      AttentionMmaPlan plan{};
      C10_CUDA_CHECK(static_cast<cudaError_t>(attention_mma_plan(p, &plan)));
      if (plan.supported) {  // else (fp32, other head dims, unaligned views, pre-sm_80) the SIMT kernel
        const at::Tensor workspace =
            at::empty({plan.workspace_floats}, q.options().dtype(at::kFloat));  // split-KV partials
        C10_CUDA_CHECK(static_cast<cudaError_t>(attention_mma_cuda(p, plan, workspace.data_ptr<float>(), stream)));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return out;
      }
    }
    C10_CUDA_CHECK(static_cast<cudaError_t>(attention_cuda(p, stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  attention_cpu(p);
  return out;
}

void store_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& cache_lens, const at::Tensor& src_start, const at::Tensor& src_len,
              const std::optional<at::Tensor>& cache_rows) {
  const char* op = "store_kv";
  check_dim(op, "k", k, 4, "[B, W, Hkv, D]");
  check_float_dtype(op, "k", k);
  check_last_dim_contiguous(op, "k", k);
  const int64_t B = k.size(0), W = k.size(1), Hkv = k.size(2), D = k.size(3);
  check_window_kv(op, "v", v, k, "k", B, W, D);
  check_size(op, "v", v, 2, Hkv, "the kv heads of k");
  check_cache(op, "k_cache", k_cache, k, "k", Hkv, D);
  check_cache(op, "v_cache", v_cache, k, "k", Hkv, D);
  const int64_t Bc = k_cache.size(0), S = k_cache.size(1);
  check_size(op, "v_cache", v_cache, 0, Bc, "the rows of k_cache");
  check_size(op, "v_cache", v_cache, 1, S, "the capacity of k_cache");
  check_same_device(op, "cache_lens", cache_lens, "k", k);
  check_same_device(op, "src_start", src_start, "k", k);
  check_same_device(op, "src_len", src_len, "k", k);
  const auto lens = check_int_range(op, "cache_lens", cache_lens, B, 0, S);
  const auto start = check_int_range(op, "src_start", src_start, B, 0, W);
  const auto len = check_int_range(op, "src_len", src_len, B, 0, W);
  if (lens && start && len) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = lens->data_ptr<int32_t>()[b], s = start->data_ptr<int32_t>()[b], m = len->data_ptr<int32_t>()[b];
      TORCH_CHECK(s + m <= W, op, ": src_start + src_len must be <= the window length ", W, ", got ", s, " + ", m,
                  " in row ", b);
      TORCH_CHECK(n + m <= S, op, ": cache overflow: cache_lens + src_len must be <= the cache capacity ", S,
                  ", got ", n, " + ", m, " in row ", b);
    }
  }
  TORCH_CHECK(cache_rows.has_value() || B <= Bc, op, ": without cache_rows, k_cache needs at least B = ", B,
              " rows, got ", Bc);
  const std::optional<at::Tensor> rows = check_cache_rows(op, cache_rows, "k", k, B, Bc);
  if (B == 0 || W == 0 || Hkv == 0 || D == 0) return;

  const bounds::StoreSpans spans =
      k.is_cuda() ? bounds::StoreSpans{cache_lens.contiguous(), src_start.contiguous(), src_len.contiguous()}
                  : bounds::clip_store_spans_cpu(cache_lens, src_start, src_len, rows, W, S, Bc);
  StoreKVParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_lens = spans.lens.data_ptr<int32_t>();
  p.cache_rows = rows ? rows->data_ptr<int32_t>() : nullptr;
  p.src_start = spans.start.data_ptr<int32_t>();
  p.src_len = spans.len.data_ptr<int32_t>();
  p.batch = checked_int(op, "B", B), p.window = checked_int(op, "W", W), p.kv_heads = checked_int(op, "Hkv", Hkv);
  p.head_dim = checked_int(op, "D", D), p.cache_capacity = checked_int(op, "S", S);
  p.cache_batch = checked_int(op, "Bc", Bc);
  p.dtype = kernel_dtype(k.scalar_type());
#if defined(D2F_WITH_CUDA)
  if (k.is_cuda()) {
    check_grid_size(op, "B", B);
    c10::cuda::CUDAGuard guard(k.device());
    store_kv_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  store_kv_cpu(p);
}

}  // namespace
}  // namespace d2f

TORCH_LIBRARY_IMPL(d2f_ext, CPU, m) {
  m.impl("attention", &d2f::attention);
  m.impl("store_kv", &d2f::store_kv);
}

#if defined(D2F_WITH_CUDA)
TORCH_LIBRARY_IMPL(d2f_ext, CUDA, m) {
  m.impl("attention", &d2f::attention);
  m.impl("store_kv", &d2f::store_kv);
}
#endif
