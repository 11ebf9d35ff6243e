"""A short run of every d2f_ext op over the cases that stress indexing, for compute-sanitizer
(memcheck, racecheck; python/gpu_check.sh runs it under both) and, with --device cpu, for the CPU
kernels: padding, GQA, head_dim 64/128, empty and full caches, permuted cache_rows, out-of-range
index values (on CUDA under CUDA-graph capture, where the ops cannot check them, or eagerly with
debug checks off when PYTORCH_NO_CUDA_MEMORY_CACHING=1; on the CPU eagerly), unmask at
vocabulary 151936 with temperature 0 and 0.8, every confidence and an inf logit, and
pipeline_step. Exits 0 after printing "sanitize_ops: ok"; the sanitizer reports any bad access.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m d2f_bench.sanitize_ops
"""

from __future__ import annotations

import argparse
import os

import torch

from d2f_ext import layout as L
from d2f_ext import ops
from d2f_ext.pipeline import BlockPipeline


def attention_cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    for D in (64, 128):
        B, W, H, Hkv, S = 3, 20, 8, 2, 24  # GQA 4:1
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
        q, k, v = rnd(B, W, H, D), rnd(B, W, Hkv, D), rnd(B, W, Hkv, D)
        k_cache, v_cache = rnd(B + 1, S, Hkv, D), rnd(B + 1, S, Hkv, D)
        lens = torch.tensor([0, S, 9], dtype=torch.int32, device=device)  # empty, full, partial
        ids = torch.tensor([[-1, -1] + [1 + i // 4 for i in range(16)] + [-1, -1]] * B, dtype=torch.int32,
                           device=device)
        rows = torch.tensor([3, 0, 2], dtype=torch.int32, device=device)  # permuted
        yield q, k, v, k_cache, v_cache, lens, ids, rows


def run_attention_and_store(device, dtype):
    for q, k, v, k_cache, v_cache, lens, ids, rows in attention_cases(device, dtype):
        ops.attention(q, k, v, k_cache, v_cache, lens, ids, rows)
        ops.attention(q, k, v, k_cache[:3].contiguous(), v_cache[:3].contiguous(), lens, ids)
        W, S = q.shape[1], k_cache.shape[1]
        start = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        length = torch.tensor([S, 0, W - 5], dtype=torch.int32, device=device)
        ops.store_kv(k_cache, v_cache, k, v, torch.tensor([0, S, 3], dtype=torch.int32, device=device),
                     start, length.clamp(max=W - start), rows)


def unmask_args(device, dtype, V=151936, B=2, W=8):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, W, V, generator=g) * 4).to(dtype)
    logits[0, 2, 77] = float("inf")
    logits[1, 5] = float("-inf")
    logits[1, 6, ::5] = float("nan")
    tokens = torch.full((B, W), V - 1, dtype=torch.long)
    ids = torch.tensor([[0, 1, 1, 1, 2, 2, 2, -1]] * B, dtype=torch.int32)
    fully_activated = torch.tensor([[1, 1, 1]] * B, dtype=torch.int32)
    return [t.to(device) for t in (logits, tokens, ids, fully_activated)], V - 1


def run_unmask(device, dtype):
    (logits, tokens, ids, fully_activated), mask_id = unmask_args(device, dtype)
    prev = logits[:, 0].contiguous()
    for temperature in (0.0, 0.8):
        for confidence in L.CONFIDENCES:
            for shift in (None, prev):
                ops.unmask(logits, tokens.clone(), ids, fully_activated, mask_id, prev_logits=shift, eos_id=3,
                           skip_threshold=0.5, temperature=temperature, sampling_strategy=confidence, seed=4)


def out_of_range_calls(device):
    """The ops with index values outside their ranges (only debug mode rejects them eagerly)."""
    q, k, v, k_cache, v_cache, lens, ids, rows = next(attention_cases(device, torch.float32))
    S = k_cache.shape[1]
    bad_lens = lens + torch.tensor([-5, S, 3], dtype=torch.int32, device=device)
    bad_rows = torch.tensor([-1, 99, 1], dtype=torch.int32, device=device)
    bad_ids = ids.clone()
    bad_ids[:, 0] = -7
    start = torch.tensor([-3, 4, 19], dtype=torch.int32, device=device)
    length = torch.tensor([10, 40, 8], dtype=torch.int32, device=device)
    (logits, tokens, uids, fully_activated), mask_id = unmask_args(device, torch.float32, V=1000)
    uids = uids.clone()
    uids[:, 1:3] = torch.tensor([3, 100], dtype=torch.int32)  # past NB = 3

    def calls():
        ops.attention(q, k, v, k_cache, v_cache, bad_lens, bad_ids, bad_rows)
        ops.store_kv(k_cache, v_cache, k, v, bad_lens, start, length, bad_rows)
        ops.unmask(logits, tokens, uids, fully_activated, mask_id, skip_threshold=0.1)
    return calls


def run_out_of_range(device):
    calls = out_of_range_calls(device)
    # Without the caching allocator (memcheck then sees every allocation's true bounds) CUDA
    # graphs cannot be captured, so the calls run eagerly, as on the CPU.
    if device.type != "cuda" or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        previous = ops.set_debug_checks(False)
        try:
            calls()
        finally:
            ops.set_debug_checks(previous)
        return
    # Debug mode on: capture must skip the value checks (they would sync) and the kernels must
    # stay in bounds on replay.
    previous = ops.set_debug_checks(True)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, checks off (the values are bad)
            ops.set_debug_checks(False)
            calls()
            ops.set_debug_checks(True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        ops.set_debug_checks(previous)


def run_pipeline(device):
    pipe = BlockPipeline(torch.tensor([5, 1, 9], dtype=torch.int32, device=device), 16, 4, 0.3, 0.9)
    for _ in range(40):
        if pipe.finished():
            return
        counts = pipe.blocks[:, L.MASKED] * (pipe.blocks[:, L.STATE] == L.ACTIVE)
        pipe.step(counts.to(torch.int32), torch.full((3,), -1, dtype=torch.int32, device=device))
    raise AssertionError("the pipeline did not finish")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        run_attention_and_store(device, dtype)
        run_unmask(device, dtype)
    run_out_of_range(device)
    run_pipeline(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize_ops: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
