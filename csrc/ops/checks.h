// Argument checks shared by the op layer. Every message starts with "<op>: <argument>" so that a
// failing call says which argument is wrong.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>

#include "kernels/params.h"

#if defined(D2F_WITH_CUDA)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace d2f::checks {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (at::ScalarType t : dtypes) s += (s.empty() ? "" : ", ") + std::string(c10::toString(t));
  return s;
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got ", t.dim(), "-D");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> dtypes) {
  for (at::ScalarType d : dtypes)
    if (t.scalar_type() == d) return;
  TORCH_CHECK(false, op, ": ", name, " must have dtype ", dtype_list(dtypes), ", got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " must have a contiguous last dimension");
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " (", expected,
              "), got ", t.size(dim));
}

// Debug mode: the value checks below (ids and lengths in range) read index tensors on the host,
// one device-to-host sync each on CUDA, about 200 per forward of an 8B model; so they run only
// when asked for (set_debug_checks, or D2F_EXT_DEBUG_CHECKS=1 in the environment of the process).
// Without them the kernels still stay in bounds: each op documents how it clamps or skips
// out-of-range values (d2f_ext/ops.py), and d2f_ext.reference follows the same rule.
inline std::atomic<bool>& debug_checks_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("D2F_EXT_DEBUG_CHECKS");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }()};
  return flag;
}

// Whether the values of `t` are checked: in debug mode only, and on CUDA only outside CUDA-graph
// capture, where the host copy would synchronise and break the capture.
inline bool value_checks_on(const at::Tensor& t) {
  if (!debug_checks_flag().load(std::memory_order_relaxed)) return false;
#if defined(D2F_WITH_CUDA)
  if (t.is_cuda()) return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
#endif
  return true;
}

// 1-D int32 tensor of `len` values; in debug mode (value_checks_on) also all in [lo, hi], and
// then the values read on the host are returned for further checks; else nullopt.
inline std::optional<at::Tensor> check_int_range(const char* op, const char* name, const at::Tensor& t,
                                                 int64_t len, int64_t lo, int64_t hi) {
  check_dim(op, name, t, 1, "[B]");
  check_dtype(op, name, t, {at::kInt});
  check_size(op, name, t, 0, len, "the batch size");
  if (!value_checks_on(t)) return std::nullopt;
  at::Tensor host = t.cpu();
  if (len > 0) {
    const int64_t mn = host.min().item<int64_t>(), mx = host.max().item<int64_t>();
    TORCH_CHECK(mn >= lo && mx <= hi, op, ": ", name, " values must be in [", lo, ", ", hi, "], got [", mn, ", ",
                mx, "]");
  }
  return host;
}

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kFloat32;
  }
}

// Floating dtypes an op accepts on the tensor's device: float16 only where CUDA kernels exist.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  if (t.is_cuda()) {
    check_dtype(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf});
  } else {
    check_dtype(op, name, t, {at::kFloat, at::kBFloat16});
  }
}

// A CUDA launch takes at most 65535 blocks along y and z; the sizes the kernels map there are
// checked before any launch, so that no kernel runs on what one that failed to launch left.
constexpr int64_t kMaxGridYZ = 65535;

inline void check_grid_size(const char* op, const char* name, int64_t v) {
  TORCH_CHECK(v <= kMaxGridYZ, op, ": ", name, " = ", v, " exceeds ", kMaxGridYZ, ", the most the CUDA kernels take");
}

inline int checked_int(const char* op, const char* name, int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, op, ": ", name, " = ", v, " does not fit the kernel's int32 range");
  return static_cast<int>(v);
}

}  // namespace d2f::checks
