"""What a busy neighbour costs the engine: the in-process engine of the serving benchmark (N rows
fed by N emulated clients, the shipped model) at 1 and 2 torch threads, alone on the machine and
beside a process that keeps --load of one core busy, as a server's clients and HTTP thread do
when they share its cores. The settings run in alternation, --repeat times (the median counts).
Prints a table, writes JSON, a markdown table and a plot.

    python -m d2f_bench.contention [--rows 16] [--load 0.4] [--repeat 3] [--out results/contention]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from d2f_bench.common import environment, torch_threads, write_json, write_markdown
from d2f_bench.serve import in_process, questions
from d2f_ext import AutoD2FModel
from d2f_ext.cli import DEFAULT_MODEL

# Busy for `load` of every 10 ms, asleep for the rest.
BUSY = """import sys, time
load = float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.01 * load:
        pass
    time.sleep(0.01 * (1 - load))
"""


def measure(model, prompts, rows: int, max_tokens: int, threads: int, load: float) -> float:
    """Generated tokens/s of the in-process engine with ``threads`` threads beside ``load`` core."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(load)]) if load > 0 else None
    try:
        with torch_threads(threads):
            r = in_process(model, prompts, rows, max_tokens)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return r["tokens"] / r["seconds"]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rows", type=int, default=16, help="engine rows = emulated clients")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--load", type=float, default=0.4, help="share of one core the neighbour keeps busy")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="results/contention")
    a = p.parse_args(argv)
    for name in ("rows", "requests", "max_tokens", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 < a.load < 1:
        p.error(f"--load must be in (0, 1), got {a.load}")
    model = AutoD2FModel.from_pretrained(a.model)
    prompts = questions(a.requests)
    settings = [(threads, load) for threads in (1, 2) for load in (0.0, a.load)]
    in_process(model, prompts[: a.rows], a.rows, a.max_tokens)  # warm-up
    samples = {s: [] for s in settings}
    for _ in range(a.repeat):
        for s in settings:
            samples[s].append(measure(model, prompts, a.rows, a.max_tokens, *s))
    rows = []
    for threads, load in settings:
        tps = statistics.median(samples[(threads, load)])
        idle = statistics.median(samples[(threads, 0.0)])
        rows.append(dict(threads=threads, load=load, tokens_per_s=tps, vs_idle=tps / idle,
                         samples=samples[(threads, load)]))
    for r in rows:
        print(f"threads {r['threads']}  neighbour {r['load']:.1f} core  {r['tokens_per_s']:8.1f} tok/s  "
              f"{r['vs_idle']:5.2f}x of idle")
    args = dict(vars(a), model=os.path.basename(os.path.normpath(a.model)))  # no machine paths in results
    write_json(os.path.join(a.out, "contention.json"), {"env": environment(), "args": args, "rows": rows})
    write_markdown(os.path.join(a.out, "contention.md"),
                   ["torch threads", "busy neighbour (cores)", "tokens / s", "vs the same threads, no neighbour"],
                   [[r["threads"], f"{r['load']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['vs_idle']:.2f}x"]
                    for r in rows])
    plot(rows, a.load, os.path.join(a.out, "contention.png"))
    return rows


def plot(rows, load, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for shift, busy in ((-0.2, False), (0.2, True)):
        ax.bar([i + shift for i in range(2)], [r["tokens_per_s"] for r in rows if (r["load"] > 0) == busy],
               width=0.4, label=f"beside a {load:.1f}-core load" if busy else "alone")
    ax.set_xticks([0, 1], ["1 thread", "2 threads"])
    ax.legend(fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("The engine in process, with and without a busy neighbour", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
