// Microbenchmark of the block-causal attention kernel at LLaDA-8B per-layer shapes
// (32 heads, 32 kv heads, head_dim 128, one row), window 32..128 over caches of 256..4096.
//   g++ -O3 -fopenmp -std=c++17 -Icsrc csrc/bench/bench_attention.cpp csrc/kernels/attention_cpu.cpp
// With -DD2F_WITH_CUDA (linking attention_cuda.cu, attention_mma_cuda.cu and cudart), --cuda times
// the SIMT kernel and, for bf16, the tensor-core kernel ("mma" rows, with their speedup).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kernels/kernels.h"

namespace {

struct Shape {
  int batch, window, heads, kv_heads, head_dim, cache, block_size;
};

uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Deterministic values in [-1, 1) stored as `dtype` (4 or 2 bytes each).
std::vector<uint8_t> random_buffer(size_t n, d2f::DType dtype, uint32_t seed) {
  const size_t elem = dtype == d2f::DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> buf(n * elem);
  uint32_t s = seed * 2654435761u + 1u;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float x = static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
    if (elem == 4) {
      std::memcpy(buf.data() + i * 4, &x, 4);
    } else {
      const uint16_t h = to_bf16(x);
      std::memcpy(buf.data() + i * 2, &h, 2);
    }
  }
  return buf;
}

struct Problem {
  std::vector<uint8_t> q, k, v, k_cache, v_cache, out;
  std::vector<int32_t> cache_lens, block_ids;
  d2f::AttentionParams p{};
};

void make_problem(const Shape& s, d2f::DType dtype, Problem& pb) {
  const size_t qn = size_t(s.batch) * s.window * s.heads * s.head_dim;
  const size_t kn = size_t(s.batch) * s.window * s.kv_heads * s.head_dim;
  const size_t cn = size_t(s.batch) * s.cache * s.kv_heads * s.head_dim;
  pb.q = random_buffer(qn, dtype, 1);
  pb.k = random_buffer(kn, dtype, 2);
  pb.v = random_buffer(kn, dtype, 3);
  pb.k_cache = random_buffer(cn, dtype, 4);
  pb.v_cache = random_buffer(cn, dtype, 5);
  pb.out.assign(pb.q.size(), 0);
  pb.cache_lens.assign(s.batch, s.cache);
  pb.block_ids.resize(size_t(s.batch) * s.window);
  for (size_t i = 0; i < pb.block_ids.size(); ++i) pb.block_ids[i] = int32_t(i % s.window) / s.block_size;

  d2f::AttentionParams& p = pb.p;
  p.q_row_stride = int64_t(s.heads) * s.head_dim, p.q_head_stride = s.head_dim;
  p.q_batch_stride = p.q_row_stride * s.window;
  p.k_row_stride = p.v_row_stride = int64_t(s.kv_heads) * s.head_dim;
  p.k_head_stride = p.v_head_stride = s.head_dim;
  p.k_batch_stride = p.v_batch_stride = p.k_row_stride * s.window;
  p.batch = s.batch, p.window = s.window, p.heads = s.heads, p.kv_heads = s.kv_heads;
  p.head_dim = s.head_dim, p.cache_capacity = s.cache, p.cache_batch = s.batch;
  p.scale = 1.0f / std::sqrt(float(s.head_dim));
  p.dtype = dtype;
  p.cache_rows = nullptr;
}

void point_at_host(Problem& pb) {
  d2f::AttentionParams& p = pb.p;
  p.q = pb.q.data(), p.k = pb.k.data(), p.v = pb.v.data();
  p.k_cache = pb.k_cache.data(), p.v_cache = pb.v_cache.data();
  p.cache_lens = pb.cache_lens.data(), p.block_ids = pb.block_ids.data();
  p.out = pb.out.data();
}

#if defined(D2F_WITH_CUDA)
// Median ms of the SIMT kernel, or of the tensor-core kernel when `mma` (0 when it does not
// support the problem).
double time_cuda(Problem& pb, const bench::Args& args, bool mma) {
  bench::DeviceBuffers dev;
  d2f::AttentionParams p = pb.p;
  p.q = dev.upload(pb.q), p.k = dev.upload(pb.k), p.v = dev.upload(pb.v);
  p.k_cache = dev.upload(pb.k_cache), p.v_cache = dev.upload(pb.v_cache), p.out = dev.upload(pb.out);
  p.cache_lens = dev.upload(pb.cache_lens), p.block_ids = dev.upload(pb.block_ids);
  if (!mma) {
    return bench::cuda_median_ms(args, [&](cudaStream_t stream) {
      bench::cuda_check(static_cast<cudaError_t>(d2f::attention_cuda(p, stream)), "attention_cuda");
    });
  }
  d2f::AttentionMmaPlan plan{};
  bench::cuda_check(static_cast<cudaError_t>(d2f::attention_mma_plan(p, &plan)), "attention_mma_plan");
  if (!plan.supported) return 0.0;
  float* workspace = dev.alloc<float>(static_cast<size_t>(plan.workspace_floats));
  return bench::cuda_median_ms(args, [&](cudaStream_t stream) {
    bench::cuda_check(static_cast<cudaError_t>(d2f::attention_mma_cuda(p, plan, workspace, stream)),
                      "attention_mma_cuda");
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args = bench::parse_args(argc, argv);
  std::vector<Shape> shapes;
  if (args.small) {
    shapes = {{1, 32, 4, 4, 64, 256, 32}, {1, 17, 4, 2, 128, 100, 4}};
  } else {
    for (int w : {32, 64, 128})
      for (int s : {256, 1024, 4096}) shapes.push_back({1, w, 32, 32, 128, s, 32});
  }
  bench::Table table("attention");
  table.header(args.cuda ? "cuda" : "cpu");
  for (d2f::DType dtype : {d2f::DType::kFloat32, d2f::DType::kBFloat16}) {
    for (const Shape& s : shapes) {
      Problem pb;
      make_problem(s, dtype, pb);
      point_at_host(pb);
      double ms = 0.0, mma_ms = 0.0;
#if defined(D2F_WITH_CUDA)
      if (args.cuda) {
        ms = time_cuda(pb, args, false);
        mma_ms = time_cuda(pb, args, true);
      }
#endif
      if (!args.cuda) ms = bench::median_ms([&] { d2f::attention_cpu(pb.p); }, args);
      // Dense count (every window key as if visible): an upper bound on the useful work.
      const double flops = 4.0 * s.batch * s.heads * s.window * double(s.cache + s.window) * s.head_dim;
      const double bytes = 2.0 * s.batch * s.cache * s.kv_heads * s.head_dim * (dtype == d2f::DType::kFloat32 ? 4 : 2);
      const std::string name = std::string(dtype == d2f::DType::kFloat32 ? "fp32" : "bf16") + " B=" +
                               std::to_string(s.batch) + " W=" + std::to_string(s.window) + " H=" +
                               std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) + " D=" +
                               std::to_string(s.head_dim) + " S=" + std::to_string(s.cache);
      table.add(args.cuda ? name + " simt" : name, ms,
                {{"GFLOP/s", flops / ms * 1e-6}, {"GB/s cache", bytes / ms * 1e-6}});
      if (mma_ms > 0.0)
        table.add(name + " mma", mma_ms,
                  {{"GFLOP/s", flops / mma_ms * 1e-6}, {"GB/s cache", bytes / mma_ms * 1e-6}, {"x simt", ms / mma_ms}});
    }
  }
  return table.finish(args) ? 0 : 1;
}
