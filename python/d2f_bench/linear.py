"""A linear layer at the few rows a decoding step runs on: d2f_ext's kernel (``ops.linear``)
against torch's ``F.linear``, float32, in one run with the two alternating, on the conformance
models' output heads (126464 and 151936 x 128) and the shipped model's layers (768 x 256,
256 x 768, 256 x 256), rows 1 to 48, at 1 and 2 threads. A timed call runs the op over enough
distinct weights of the shape to fill 16 MB, as a model's layers stream theirs, and the time is per
weight. Sets where ``ops.LINEAR_KERNEL_MAX_ROWS`` should lie on this machine. Prints a table,
writes JSON, a markdown table and a plot.

    python -m d2f_bench.linear [--rows 1 2 4 8 16 24 32 48] [--threads 1 2] [--repeat 7] [--out results/linear]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from d2f_bench.common import environment, interleaved, torch_threads, write_json, write_markdown
from d2f_ext import ops

SHAPES = ((126464, 128), (151936, 128), (768, 256), (256, 768), (256, 256))  # (out, in) features
WORKING_SET_BYTES = 16 << 20


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shape", type=int, nargs=2, action="append", metavar=("OUT", "IN"),
                    help="a weight shape, out x in features (repeatable; default: the conformance heads "
                         "and the shipped model's layers)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="results/linear")
    a = ap.parse_args(argv)
    shapes = [tuple(s) for s in a.shape] if a.shape else list(SHAPES)
    for name, values in (("rows", a.rows), ("threads", a.threads), ("shape", [v for s in shapes for v in s])):
        if any(v < 1 for v in values):
            ap.error(f"--{name} must be >= 1, got {values}")
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    if not ops.HAVE_C:
        ap.error("the compiled extension d2f_ext._C is not loaded: no kernel to measure")
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in a.threads:
        with torch_threads(threads):
            for N, K in shapes:
                copies = max(1, math.ceil(WORKING_SET_BYTES / (4 * N * K)))
                ws = [torch.randn(N, K, generator=g) for _ in range(copies)]
                for R in a.rows:
                    x = torch.randn(R, K, generator=g)
                    err = max((torch.ops.d2f_ext.linear(x, w) - F.linear(x, w)).abs().max().item() for w in ws)
                    t = interleaved({"kernel": lambda: [torch.ops.d2f_ext.linear(x, w) for w in ws],
                                     "linear": lambda: [F.linear(x, w) for w in ws]}, repeat=a.repeat)
                    rows.append(dict(threads=threads, out_features=N, in_features=K, rows=R,
                                     kernel_ms=t["kernel"] * 1e3 / copies, linear_ms=t["linear"] * 1e3 / copies,
                                     ratio=t["linear"] / t["kernel"], max_abs_diff=err))
                    r = rows[-1]
                    print(f"threads {threads} weight {N}x{K} rows {R:3d}: kernel {r['kernel_ms']:8.3f} ms, "
                          f"F.linear {r['linear_ms']:8.3f} ms, {r['ratio']:.2f}x", flush=True)
    args = dict(rows=a.rows, threads=a.threads, shapes=shapes, repeat=a.repeat)
    write_json(os.path.join(a.out, "linear.json"), {"env": environment(), "args": args, "rows": rows})
    write_markdown(os.path.join(a.out, "linear.md"),
                   ["threads", "weight (out x in)", "rows", "d2f_ext kernel (ms)", "F.linear (ms)", "F.linear / kernel"],
                   [[r["threads"], f"{r['out_features']} x {r['in_features']}", r["rows"], f"{r['kernel_ms']:.3f}",
                     f"{r['linear_ms']:.3f}", f"{r['ratio']:.2f}x"] for r in rows])
    plot(rows, os.path.join(a.out, "linear.png"))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 3.5), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], threads):
        for shape in dict.fromkeys((r["out_features"], r["in_features"]) for r in rows):
            sel = [r for r in rows if r["threads"] == n and (r["out_features"], r["in_features"]) == shape]
            ax.plot([r["rows"] for r in sel], [r["ratio"] for r in sel], "o-", label=f"{shape[0]} x {shape[1]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows")
        ax.set_title(f"{n} thread(s)")
    axes[0][0].set_ylabel("F.linear time / kernel time")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
