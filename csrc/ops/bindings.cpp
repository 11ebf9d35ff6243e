// The one schema list of the d2f_ext op namespace. Backends register in csrc/ops/<op>.cpp with
// TORCH_LIBRARY_IMPL; fake (meta) kernels for torch.compile live in d2f_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "ops/checks.h"

extern "C" {
// Importing d2f_ext._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

std::string build_info() {
  std::string info = "torch=" D2F_TORCH_VERSION ";cuda=";
#if defined(D2F_WITH_CUDA)
  info += "1;cuda_archs=" D2F_CUDA_ARCHS;
#else
  info += "0;cuda_archs=";
#endif
#if defined(_OPENMP)
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

// Returns the previous setting, so that a caller can restore it.
bool set_debug_checks(bool on) { return d2f::checks::debug_checks_flag().exchange(on); }

bool debug_checks() { return d2f::checks::debug_checks_flag().load(); }

}  // namespace

TORCH_LIBRARY(d2f_ext, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor block_ids, Tensor? cache_rows, float scale, str? kernel=None) -> Tensor");
  m.def(
      "store_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_lens, "
      "Tensor src_start, Tensor src_len, Tensor? cache_rows) -> ()");
  m.def(
      "unmask(Tensor logits, Tensor(a!) tokens, Tensor block_ids, Tensor fully_activated, "
      "Tensor? prev_logits, int mask_id, int eos_id, float skip_threshold, float temperature, "
      "int confidence, int seed) -> (Tensor, Tensor)");
  m.def(
      "pipeline_step(Tensor(a!) rows, Tensor(b!) blocks, Tensor counts, Tensor eos_block, "
      "int block_size, float block_add_threshold, float decoded_token_threshold) -> ()");
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor input, Tensor cos, Tensor sin) -> Tensor");
  m.def("build_info() -> str", &build_info);
  m.def("set_debug_checks(bool on) -> bool", &set_debug_checks);
  m.def("debug_checks() -> bool", &debug_checks);
}
