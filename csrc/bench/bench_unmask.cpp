// Microbenchmark of the unmask kernel at LLaDA (V = 126464) and Dream (V = 151936) vocabularies,
// every window position masked (the worst case), greedy and sampled, fp32 and bf16 logits.
//   g++ -O3 -fopenmp -std=c++17 -Icsrc -Icsrc/bench csrc/bench/bench_unmask.cpp csrc/kernels/unmask_cpu.cpp
// With -DD2F_WITH_CUDA (linking unmask_cuda.cu and cudart), --cuda times the CUDA kernel.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kernels/kernels.h"

namespace {

struct Shape {
  int batch, window, vocab;
  d2f::DType dtype;
  float temperature;
  d2f::Confidence confidence;
};

// Logits in [-8, 8) from an LCG, as fp32 or bf16 (truncated: the bench needs no rounding).
std::vector<uint8_t> random_logits(size_t n, d2f::DType dtype) {
  const size_t elem = dtype == d2f::DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> buf(n * elem);
  uint32_t s = 12345u;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float x = static_cast<float>(s >> 8) * (16.0f / 16777216.0f) - 8.0f;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (elem == 4) {
      std::memcpy(buf.data() + i * 4, &u, 4);
    } else {
      const uint16_t h = static_cast<uint16_t>(u >> 16);
      std::memcpy(buf.data() + i * 2, &h, 2);
    }
  }
  return buf;
}

// Host buffers and params; the kernel rewrites tokens, so `reset` re-masks them before each run.
struct Problem {
  std::vector<uint8_t> logits;
  std::vector<int64_t> tokens, cand_token;
  std::vector<int32_t> block_ids, fully_activated, counts, eos;
  std::vector<float> cand_prob, cand_conf;
  d2f::UnmaskParams p{};
  static constexpr int64_t kMask = 7;

  explicit Problem(const Shape& s) {
    const size_t bw = size_t(s.batch) * s.window;
    logits = random_logits(bw * s.vocab, s.dtype);
    tokens.assign(bw, kMask);
    cand_token.resize(bw);
    block_ids.assign(bw, 0);
    fully_activated.assign(s.batch, 1);
    counts.resize(s.batch);
    eos.resize(s.batch);
    cand_prob.resize(bw);
    cand_conf.resize(bw);
    p.logits = logits.data();
    p.logits_batch_stride = int64_t(s.window) * s.vocab;
    p.logits_row_stride = s.vocab;
    p.tokens = tokens.data();
    p.block_ids = block_ids.data();
    p.fully_activated = fully_activated.data();
    p.fully_activated_batch_stride = 1;
    p.counts = counts.data();
    p.eos_block = eos.data();
    p.cand_token = cand_token.data();
    p.cand_prob = cand_prob.data();
    p.cand_conf = cand_conf.data();
    p.batch = s.batch;
    p.window = s.window;
    p.vocab = s.vocab;
    p.num_blocks = 1;
    p.mask_id = kMask;
    p.eos_id = -1;
    p.skip_threshold = 0.9f;
    p.temperature = s.temperature;
    p.confidence = s.confidence;
    p.seed = 1;
    p.dtype = s.dtype;
  }
  void reset() { std::fill(tokens.begin(), tokens.end(), kMask); }
};

std::string label(const Shape& s) {
  static const char* conf[] = {"prob", "margin", "entropy"};
  return "B=" + std::to_string(s.batch) + " W=" + std::to_string(s.window) + " V=" + std::to_string(s.vocab) +
         (s.dtype == d2f::DType::kFloat32 ? " f32" : " bf16") + (s.temperature > 0 ? " T=1" : " T=0") + " " +
         conf[static_cast<int>(s.confidence)];
}

double logit_gb(const Shape& s) {
  const double elem = s.dtype == d2f::DType::kFloat32 ? 4.0 : 2.0;
  return double(s.batch) * s.window * s.vocab * elem * 1e-9;
}

#if defined(D2F_WITH_CUDA)
double time_cuda(Problem& pb, const bench::Args& args) {
  bench::DeviceBuffers dev;
  d2f::UnmaskParams p = pb.p;
  p.logits = dev.upload(pb.logits);
  p.tokens = dev.upload(pb.tokens);
  p.block_ids = dev.upload(pb.block_ids);
  p.fully_activated = dev.upload(pb.fully_activated);
  p.counts = dev.upload(pb.counts);
  p.eos_block = dev.upload(pb.eos);
  p.cand_token = dev.upload(pb.cand_token);
  p.cand_prob = dev.upload(pb.cand_prob);
  p.cand_conf = dev.upload(pb.cand_conf);
  p.partials = dev.upload(std::vector<uint8_t>(pb.tokens.size() * d2f::kUnmaskMaxSplits * d2f::kUnmaskPartialBytes));
  const size_t token_bytes = pb.tokens.size() * sizeof(int64_t);
  return bench::cuda_median_ms(
      args, [&](cudaStream_t stream) { d2f::unmask_cuda(p, stream); },
      [&] { cudaMemcpy(p.tokens, pb.tokens.data(), token_bytes, cudaMemcpyHostToDevice); });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args = bench::parse_args(argc, argv);
  using d2f::Confidence;
  using d2f::DType;
  std::vector<Shape> shapes;
  if (args.small) {
    shapes = {{1, 8, 4096, DType::kFloat32, 0.0f, Confidence::kProbability},
              {1, 8, 4096, DType::kBFloat16, 1.0f, Confidence::kNegEntropy}};
  } else {
    for (int vocab : {126464, 151936})
      for (int batch : {1, 8})
        for (int window : {32, 128})
          for (DType dt : {DType::kFloat32, DType::kBFloat16})
            shapes.push_back({batch, window, vocab, dt, 0.0f, Confidence::kProbability});
    for (Confidence c : {Confidence::kMargin, Confidence::kNegEntropy})
      shapes.push_back({1, 64, 151936, DType::kBFloat16, 0.0f, c});
    shapes.push_back({1, 64, 151936, DType::kBFloat16, 1.0f, Confidence::kProbability});
  }
  bench::Table table("unmask");
  table.header(args.cuda ? "cuda" : "cpu");
  for (const Shape& s : shapes) {
    Problem pb(s);
    double ms;
#if defined(D2F_WITH_CUDA)
    if (args.cuda) {
      ms = time_cuda(pb, args);
    } else
#endif
    {
      ms = bench::median_ms([&] { pb.reset(); d2f::unmask_cpu(pb.p); }, args);
    }
    table.add(label(s), ms, {{"GB/s", logit_gb(s) / ms * 1e3}});
  }
  return table.finish(args) ? 0 : 1;
}
