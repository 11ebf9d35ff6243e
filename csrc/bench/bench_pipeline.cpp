// Microbenchmark of the D2F block-state step over batches of 1..256 rows, LLaDA-like settings
// (512 new tokens in blocks of 32, so 17 blocks a row, or 64 and 9 blocks).
//   g++ -O3 -fopenmp -std=c++17 -Icsrc csrc/bench/bench_pipeline.cpp csrc/kernels/pipeline.cpp
// With -DD2F_WITH_CUDA (linking pipeline_cuda.cu and cudart), --cuda times the CUDA kernel.
#include <cstdint>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kernels/kernels.h"

namespace {

struct State {
  std::vector<int32_t> rows, blocks, counts, eos;
  d2f::PipelineParams p{};
};

// A mid-decode row that a step with zero counts leaves as it is (it only re-plans the same
// window), so that every timed step does the full work on the same state: six blocks cached,
// then three active ones, none ready to cache and the newest below the add threshold.
void make_state(int batch, int num_blocks, int block_size, State& s) {
  s.rows.assign(size_t(batch) * d2f::kNumRowFields, 0);
  s.blocks.assign(size_t(batch) * d2f::kNumBlockFields * num_blocks, 0);
  s.counts.assign(size_t(batch) * num_blocks, 0);
  s.eos.assign(batch, -1);
  const int active = std::min(3, num_blocks - 1), cached = num_blocks - active > 6 ? 6 : num_blocks - active;
  for (int b = 0; b < batch; ++b) {
    int32_t* r = s.rows.data() + size_t(b) * d2f::kNumRowFields;
    int32_t* blk = s.blocks.data() + size_t(b) * d2f::kNumBlockFields * num_blocks;
    const int prompt = 100 + b % 7;
    int32_t start = 0;
    for (int i = 0; i < cached + active; ++i) {
      const int32_t len = i == 0 ? prompt : block_size;
      const bool in_cache = i < cached;
      const int32_t masked[] = {3, block_size / 2, block_size};
      blk[d2f::kStart * num_blocks + i] = start;
      blk[d2f::kLen * num_blocks + i] = len;
      blk[d2f::kMasked * num_blocks + i] = in_cache ? 0 : masked[i - cached];
      blk[d2f::kState * num_blocks + i] = in_cache ? d2f::kInCache : d2f::kActive;
      blk[d2f::kFullyActivated * num_blocks + i] = i <= cached;
      start += len;
      if (in_cache) r[d2f::kCacheLen] = start;
    }
    r[d2f::kNumBlocks] = cached + active;
    r[d2f::kEosBlock] = -1;
    r[d2f::kPromptLen] = prompt;
  }
  d2f::PipelineParams& p = s.p;
  p.rows = s.rows.data(), p.blocks = s.blocks.data(), p.counts = s.counts.data(), p.eos_block = s.eos.data();
  p.batch = batch, p.num_blocks = num_blocks, p.block_size = block_size;
  p.block_add_threshold = 0.9, p.decoded_token_threshold = 0.95;
}

// Bytes one step reads and writes: rows and blocks both ways, counts and eos read.
double step_bytes(const State& s) {
  return 2.0 * 4.0 * (s.rows.size() + s.blocks.size()) + 4.0 * (s.counts.size() + s.eos.size());
}

#if defined(D2F_WITH_CUDA)
// Per-step time of `inner` back-to-back launches, as a decode loop issues them.
double time_cuda(const State& s, const bench::Args& args, int inner) {
  bench::DeviceBuffers dev;
  d2f::PipelineParams p = s.p;
  p.rows = dev.upload(s.rows), p.blocks = dev.upload(s.blocks);
  p.counts = dev.upload(s.counts), p.eos_block = dev.upload(s.eos);
  return bench::cuda_median_ms(args, [&](cudaStream_t stream) {
           for (int j = 0; j < inner; ++j) d2f::pipeline_step_cuda(p, stream);
         }) / inner;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args = bench::parse_args(argc, argv);
  const std::vector<int> batches = args.small ? std::vector<int>{1, 16} : std::vector<int>{1, 4, 16, 64, 256};
  // One step of one row is well under a microsecond: time many per sample.
  const int inner = args.small ? 10 : 1000;
  bench::Table table("pipeline_step");
  table.header(args.cuda ? "cuda" : "cpu");
  for (int block_size : {32, 64}) {
    const int num_blocks = 1 + 512 / block_size;
    for (int batch : batches) {
      State s;
      make_state(batch, num_blocks, block_size, s);
      double ms = 0.0;
#if defined(D2F_WITH_CUDA)
      if (args.cuda) ms = time_cuda(s, args, inner);
#endif
      if (!args.cuda) {
        ms = bench::median_ms([&] { for (int j = 0; j < inner; ++j) d2f::pipeline_step_cpu(s.p); }, args) / inner;
      }
      const std::string shape = "B=" + std::to_string(batch) + " NB=" + std::to_string(num_blocks) +
                                " block=" + std::to_string(block_size);
      table.add(shape, ms, {{"us/step", ms * 1e3}, {"GB/s", step_bytes(s) / ms * 1e-6}, {"rows/us", batch / ms * 1e-3}});
    }
  }
  return table.finish(args) ? 0 : 1;
}
