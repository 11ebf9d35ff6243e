// Shared helpers of the torch-free C++ microbenchmarks: flags, timing, a printed table and a
// JSON dump of the same rows. Header-only so that each bench stays one source file.
//
//   bench::Args args = bench::parse_args(argc, argv);   // --small, --json PATH, --cuda
//   // with --cuda: bench::DeviceBuffers, bench::cuda_median_ms, bench::cuda_check (built with
//   // -DD2F_WITH_CUDA); any CUDA error aborts the run with a message
//   bench::Table table("attention");
//   double ms = bench::median_ms([&] { kernel(p); }, args);
//   table.add("W=32 S=1024", ms, {{"GFLOP/s", flops / ms * 1e-6}});
//   table.finish(args);
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(D2F_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace bench {

struct Args {
  bool small = false;  // a tiny, quick run (CI smoke test)
  bool cuda = false;   // time the CUDA kernels instead of the CPU ones
  std::string json;    // write the rows here when non-empty
  int warmup = 3;
  int repeats = 15;
};

inline void usage(const char* prog) {
  std::fprintf(stderr, "usage: %s [--small] [--cuda] [--json PATH] [--repeats N]\n", prog);
}

inline Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--small")) {
      a.small = true;
    } else if (!std::strcmp(argv[i], "--cuda")) {
      a.cuda = true;
    } else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      a.json = argv[++i];
    } else if (!std::strcmp(argv[i], "--repeats") && i + 1 < argc) {
      a.repeats = std::max(1, std::atoi(argv[++i]));
    } else {
      usage(argv[0]);
      std::exit(2);
    }
  }
  if (a.small) {
    a.warmup = 1;
    a.repeats = std::min(a.repeats, 3);
  }
  // Exit status 2, as for a bad flag, so that scripts can tell "cannot run" from a failed run.
  if (a.cuda) {
#if defined(D2F_WITH_CUDA)
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::fprintf(stderr, "--cuda: no CUDA device\n");
      std::exit(2);
    }
#else
    std::fprintf(stderr, "built without CUDA: rebuild with -DD2F_WITH_CUDA for --cuda\n");
    std::exit(2);
#endif
  }
  return a;
}

// Median wall time in ms of `fn` over args.repeats runs after args.warmup untimed runs. `sync`
// runs after each call (e.g. cudaStreamSynchronize) so that asynchronous work is counted.
template <typename Fn, typename Sync>
double median_ms(Fn&& fn, const Args& args, Sync&& sync) {
  for (int i = 0; i < args.warmup; ++i) fn();
  sync();
  std::vector<double> ms;
  for (int i = 0; i < args.repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    sync();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <typename Fn>
double median_ms(Fn&& fn, const Args& args) {
  return median_ms(std::forward<Fn>(fn), args, [] {});
}

// Median of per-repeat times the caller measures itself (cudaEvent timing).
inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#if defined(D2F_WITH_CUDA)
// Aborts the benchmark on any CUDA error, so that a failed launch never prints a time.
inline void cuda_check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}

// Device copies of host vectors, freed together when the bench case ends.
class DeviceBuffers {
 public:
  DeviceBuffers() = default;
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;
  ~DeviceBuffers() {
    for (void* d : ptrs_) cudaFree(d);
  }

  template <typename T>
  T* alloc(size_t n) {
    void* d = nullptr;
    cuda_check(cudaMalloc(&d, n * sizeof(T)), "cudaMalloc");
    ptrs_.push_back(d);
    return static_cast<T*>(d);
  }

  template <typename T>
  T* upload(const std::vector<T>& host) {
    T* d = alloc<T>(host.size());
    cuda_check(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    return d;
  }

 private:
  std::vector<void*> ptrs_;
};

// Median ms of `launch(stream)` timed with CUDA events over args.repeats runs after
// args.warmup untimed ones; `reset` runs before each, outside the timed span.
template <typename Launch, typename Reset>
double cuda_median_ms(const Args& args, Launch&& launch, Reset&& reset) {
  cudaStream_t stream;
  cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
  cudaEvent_t start, stop;
  cuda_check(cudaEventCreate(&start), "cudaEventCreate");
  cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<double> ms;
  for (int i = 0; i < args.warmup + args.repeats; ++i) {
    reset();
    cuda_check(cudaEventRecord(start, stream), "cudaEventRecord");
    launch(stream);
    cuda_check(cudaGetLastError(), "the kernel launch");
    cuda_check(cudaEventRecord(stop, stream), "cudaEventRecord");
    cuda_check(cudaEventSynchronize(stop), "the kernel run");
    float t = 0.0f;
    cuda_check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    if (i >= args.warmup) ms.push_back(t);
  }
  cuda_check(cudaEventDestroy(start), "cudaEventDestroy");
  cuda_check(cudaEventDestroy(stop), "cudaEventDestroy");
  cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  return median(ms);
}

template <typename Launch>
double cuda_median_ms(const Args& args, Launch&& launch) {
  return cuda_median_ms(args, std::forward<Launch>(launch), [] {});
}
#endif

struct Row {
  std::string shape;
  double ms;
  std::vector<std::pair<std::string, double>> metrics;  // e.g. {"GB/s", 12.3}
};

class Table {
 public:
  explicit Table(std::string name) : name_(std::move(name)) {}

  void add(std::string shape, double ms, std::vector<std::pair<std::string, double>> metrics = {}) {
    const Row& r = rows_.emplace_back(Row{std::move(shape), ms, std::move(metrics)});
    std::printf("%-44s | %10.3f ms", r.shape.c_str(), r.ms);
    for (const auto& m : r.metrics) std::printf(" | %10.2f %s", m.second, m.first.c_str());
    std::printf("\n");
    std::fflush(stdout);
  }

  void header(const char* device) const {
    std::printf("== %s (%s) ==\n%-44s | %13s | metrics\n", name_.c_str(), device, "shape", "median");
  }

  // Writes {"bench": name, "rows": [{"shape", "median_ms", <metric>: value...}]} when asked.
  bool finish(const Args& args) const {
    if (args.json.empty()) return true;
    FILE* f = std::fopen(args.json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", args.json.c_str());
      return false;
    }
    std::fprintf(f, "{\"bench\": \"%s\", \"rows\": [", escape(name_).c_str());
    for (size_t i = 0; i < rows_.size(); ++i) {
      const Row& r = rows_[i];
      std::fprintf(f, "%s\n  {\"shape\": \"%s\", \"median_ms\": %.6f", i ? "," : "", escape(r.shape).c_str(), r.ms);
      for (const auto& m : r.metrics) std::fprintf(f, ", \"%s\": %.6f", escape(m.first).c_str(), m.second);
      std::fprintf(f, "}");
    }
    std::fprintf(f, "\n]}\n");
    return std::fclose(f) == 0;
  }

 private:
  static std::string escape(const std::string& s) {
    std::string out;
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out;
  }

  std::string name_;
  std::vector<Row> rows_;
};

}  // namespace bench
