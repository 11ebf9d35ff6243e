// The CPU side of the ops' rule for index values outside their documented range, which are only
// rejected in debug mode (checks.h): the CUDA kernels clamp or skip such values in place, and
// these helpers give the CPU kernels inputs that they can index with, meaning the same thing.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace d2f::bounds {

// attention: a row whose cache_rows value is outside [0, Bc) reads no cache (cache_rows 0 with
// length 0); cache_lens clamps to [0, S].
struct CacheIndex {
  at::Tensor lens;
  std::optional<at::Tensor> rows;
};

inline CacheIndex clamp_cache_index_cpu(const at::Tensor& cache_lens, const std::optional<at::Tensor>& cache_rows,
                                        int64_t S, int64_t Bc) {
  at::Tensor lens = cache_lens.clamp(0, S).contiguous();
  if (!cache_rows) return {lens, std::nullopt};
  const at::Tensor bad = cache_rows->lt(0).logical_or_(cache_rows->ge(Bc));
  return {lens.masked_fill(bad, 0).contiguous(), cache_rows->masked_fill(bad, 0).contiguous()};
}

// store_kv: window row src_start[b] + i (0 <= i < src_len[b]) goes to cache position
// cache_lens[b] + i of cache row cache_rows[b]; a copy whose source, destination position or
// cache row is out of range is skipped. The copies kept form one span, returned as
// (cache_lens, src_start, src_len) with src_len 0 where nothing is copied.
struct StoreSpans {
  at::Tensor lens, start, len;
};

inline StoreSpans clip_store_spans_cpu(const at::Tensor& cache_lens, const at::Tensor& src_start,
                                       const at::Tensor& src_len, const std::optional<at::Tensor>& cache_rows,
                                       int64_t W, int64_t S, int64_t Bc) {
  StoreSpans out{cache_lens.contiguous().clone(), src_start.contiguous().clone(), src_len.contiguous().clone()};
  const at::Tensor rows = cache_rows ? cache_rows->contiguous() : at::Tensor();
  int32_t* n = out.lens.data_ptr<int32_t>();
  int32_t* s = out.start.data_ptr<int32_t>();
  int32_t* m = out.len.data_ptr<int32_t>();
  for (int64_t b = 0; b < out.len.size(0); ++b) {
    const int64_t row = cache_rows ? rows.data_ptr<int32_t>()[b] : b;
    const int64_t i0 = std::max<int64_t>({0, -int64_t{s[b]}, -int64_t{n[b]}});
    const int64_t i1 = std::min<int64_t>({m[b], W - s[b], S - n[b]});
    if (row < 0 || row >= Bc || i1 <= i0) {
      n[b] = s[b] = m[b] = 0;
      continue;
    }
    n[b] = static_cast<int32_t>(n[b] + i0);
    s[b] = static_cast<int32_t>(s[b] + i0);
    m[b] = static_cast<int32_t>(i1 - i0);
  }
  return out;
}

}  // namespace d2f::bounds
