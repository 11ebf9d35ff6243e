"""Timing, JSON and plot helpers shared by the benchmark modules."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Callable, Optional

import torch


def interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, repeat: int = 7, device=None) -> dict[str, float]:
    """Median seconds of each fn, timed in alternation so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda = device is not None and torch.device(device).type == "cuda"
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(_cuda_seconds(fn) if cuda else _wall_seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _wall_seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_seconds(fn) -> float:
    # Events time the device work on the stream; the sync before starts every call on an idle GPU
    # so that no earlier call's queued kernels are billed to this one.
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def building_on(device, dtype: torch.dtype):
    """Modules created inside are allocated and randomly initialised on ``device`` in ``dtype``
    directly: an 8B model never exists as an fp32 copy, and initialising it on a GPU takes seconds."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def copy_bandwidth(device, nbytes: int, repeat: int = 7) -> float:
    """Device memory bandwidth in bytes/s, from a large tensor copy (each byte read once and
    written once, so 2 * nbytes move per copy): the rate that bounds streaming weights."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, repeat=repeat, device=device)["copy"]
    return 2 * nbytes / t


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch's CPU thread count set to ``n`` (None: left alone) inside the block and restored
    after it: the programs' main functions are also called in-process, by the tests."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def write_markdown(path: str, header: list[str], rows: list[list]) -> None:
    """The benchmark's table as markdown, ready for the README."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def environment() -> dict:
    import platform

    import d2f_ext
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "d2f_ext": d2f_ext.build_info(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cuda_runtime": torch.version.cuda}
