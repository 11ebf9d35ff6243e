"""Timing, JSON and plot helpers shared by the benchmark programs in python/."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, repeat: int = 7, device=None) -> dict[str, float]:
    """Median seconds of each fn, timed in alternation so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
