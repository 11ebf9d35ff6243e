#!/usr/bin/env bash
# Everything worth running on a GPU machine, in one go, from the repository root:
#     bash python/gpu_check.sh [OUT]        (OUT defaults to results/gpu)
# Builds d2f_ext in place for sm_90 with every core, then: the selftest, the CUDA tests,
# compute-sanitizer memcheck and racecheck over d2f_bench.sanitize_ops, the kernel and step
# benchmarks and the C++ microbenchmarks. Needs torch with CUDA, nvcc, pytest, cmake and ninja as
# installed (no network). Each step is time-boxed so that the whole run ends within 8 minutes on
# one H200; a failed step does not stop the others; logs and results go to OUT, and a summary of
# the steps closes the run (exit status 1 if any failed).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The d2f_ext built here (not an installed copy), and the benchmark package beside it.
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))
SUMMARY=()
FAILED=0

# step NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (less if the run's deadline is
# nearer), its output into $OUT/NAME.log, and records the verdict.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( cap > left )) && cap=$left
  if (( cap < 5 )); then
    SUMMARY+=("SKIP  $name (out of time)")
    FAILED=1
    return 1
  fi
  echo "== $name (at most ${cap}s)"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 5 "$OUT/$name.log"
  if (( rc == 0 )); then
    SUMMARY+=("PASS  $name (${took}s)")
  else
    (( rc == 124 || rc == 137 )) && SUMMARY+=("FAIL  $name (timed out after ${took}s)") || SUMMARY+=("FAIL  $name (exit $rc, ${took}s)")
    FAILED=1
  fi
  return $rc
}

# Whether compute-sanitizer exists and starts a CUDA program with torch (it may not match the driver).
sanitizer_works() {
  command -v compute-sanitizer > /dev/null && timeout 60 compute-sanitizer --error-exitcode 1 \
    python -c "import torch; torch.ones(1, device='cuda').sum().item()" > "$OUT/sanitizer_probe.log" 2>&1
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if step build 240 python setup.py build_ext --inplace; then
  step selftest 60 python -m d2f_ext.selftest --device cuda
  step pytest_cuda 150 python -m pytest -q -m cuda tests -p no:cacheprovider
  if sanitizer_works; then
    # memcheck sees each tensor's own bounds only without the caching allocator.
    step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 python -m d2f_bench.sanitize_ops
    step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 python -m d2f_bench.sanitize_ops
  else
    echo "compute-sanitizer is absent or does not start (see sanitizer_probe.log): memcheck and racecheck skipped"
    SUMMARY+=("SKIP  memcheck, racecheck (no working compute-sanitizer)")
  fi
  step bench_kernels 90 python -m d2f_bench.kernels --device cuda --out "$OUT/kernels"
  step bench_step 60 python -m d2f_bench.step --device cuda --out "$OUT/step"
else
  SUMMARY+=("SKIP  selftest, tests, sanitizers, python benchmarks (no build)")
fi
GENERATOR=()
command -v ninja > /dev/null && GENERATOR=(-G Ninja)
if step cmake_configure 30 cmake -S . -B build/cmake "${GENERATOR[@]}" -DCMAKE_CUDA_ARCHITECTURES=90 \
    && step cmake_build 90 cmake --build build/cmake -j "$MAX_JOBS"; then
  for b in attention unmask pipeline; do
    step "cpp_$b" 30 build/cmake/bench_$b --cuda --json "$OUT/cpp_$b.json"
  done
fi

echo
echo "gpu_check summary (logs and results in $OUT):"
printf '  %s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
