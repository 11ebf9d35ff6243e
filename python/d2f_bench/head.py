"""The output head at the few rows a decoding step reads: d2f_ext's kernel (``ops.head``) against
torch's ``F.linear`` on the conformance models' heads (126464 and 151936 x 128, float32), rows 1 to
32, at 1 and 2 threads, in one run with the two alternating. Sets where ``ops.HEAD_KERNEL_MAX_ROWS``
should lie on this machine. Prints a table, writes JSON, a markdown table and a plot.

    python -m d2f_bench.head [--rows 1 2 4 8 16 24 32] [--threads 1 2] [--repeat 7] [--out results/head]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from d2f_bench.common import environment, interleaved, torch_threads, write_json, write_markdown
from d2f_ext import ops

VOCABS = (126464, 151936)
HIDDEN = 128


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="results/head")
    a = ap.parse_args(argv)
    for name in ("rows", "threads", "vocab"):
        if any(v < 1 for v in getattr(a, name)):
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    if not ops.HAVE_C:
        ap.error("the compiled extension d2f_ext._C is not loaded: no kernel to measure")
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in a.threads:
        with torch_threads(threads):
            for V in a.vocab:
                w = torch.randn(V, HIDDEN, generator=g)
                for R in a.rows:
                    x = torch.randn(R, HIDDEN, generator=g)
                    err = (torch.ops.d2f_ext.head(x, w) - F.linear(x, w)).abs().max().item()
                    t = interleaved({"kernel": lambda: torch.ops.d2f_ext.head(x, w), "linear": lambda: F.linear(x, w)},
                                    repeat=a.repeat)
                    rows.append(dict(threads=threads, vocab=V, rows=R, kernel_ms=t["kernel"] * 1e3,
                                     linear_ms=t["linear"] * 1e3, ratio=t["linear"] / t["kernel"], max_abs_diff=err))
                    r = rows[-1]
                    print(f"threads {threads} vocab {V} rows {R:3d}: kernel {r['kernel_ms']:7.2f} ms, "
                          f"F.linear {r['linear_ms']:7.2f} ms, {r['ratio']:.2f}x", flush=True)
    args = {k: getattr(a, k) for k in ("rows", "threads", "vocab", "repeat")}
    write_json(os.path.join(a.out, "head.json"), {"env": environment(), "args": args, "hidden": HIDDEN, "rows": rows})
    write_markdown(os.path.join(a.out, "head.md"),
                   ["threads", "vocabulary", "rows", "d2f_ext kernel (ms)", "F.linear (ms)", "F.linear / kernel"],
                   [[r["threads"], r["vocab"], r["rows"], f"{r['kernel_ms']:.2f}", f"{r['linear_ms']:.2f}",
                     f"{r['ratio']:.2f}x"] for r in rows])
    plot(rows, os.path.join(a.out, "head.png"))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for threads in sorted({r["threads"] for r in rows}):
        for V in sorted({r["vocab"] for r in rows}):
            sel = [r for r in rows if r["threads"] == threads and r["vocab"] == V]
            ax.plot([r["rows"] for r in sel], [r["ratio"] for r in sel], "o-", label=f"{threads} thread(s), V={V}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows")
    ax.set_ylabel("F.linear time / kernel time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
