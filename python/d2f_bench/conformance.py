"""The engine's D2F decode path against the plain-PyTorch reference loop (the mirror of the D2F
authors' loop, whole-window output head included) on the conformance models: the runs in
tests/data/conformance, each prompt alone and each parameter set as one batch, in one run with
the paths alternating run by run. Both must give the same tokens and forwards; the ratio of
generated tokens/s is what the engine saves (kernels, the output head only where logits are read,
batching). Writes conformance.json, .md and .png.

    python -m d2f_bench.conformance [--cases tests/data/conformance] [--threads 2] [--repeat 3]
                                    [--out results/conformance]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from d2f_bench.common import environment, torch_threads, write_json, write_markdown
from d2f_bench.tiny import write_conformance_checkpoint
from d2f_ext import D2FConfig
from d2f_ext.decoding import decode
from d2f_ext.models import load_model

CASES = os.path.join("tests", "data", "conformance")  # the repository's, from its root
PATHS = ("engine, each prompt alone", "engine, each parameter set batched", "reference loop")


def _runs_by_params(case):
    groups = {}
    for run in case["d2f_runs"]:
        key = (tuple(sorted(run["params"].items())), run["max_new_tokens"])
        groups.setdefault(key, []).append(run)
    return [(D2FConfig(max_new_tokens=runs[0]["max_new_tokens"], **runs[0]["params"]), runs)
            for runs in groups.values()]


def bench_case(cases: str, name: str, repeat: int) -> list[dict]:
    with open(os.path.join(cases, f"{name}.json"), encoding="utf-8") as f:
        case = json.load(f)
    folder = write_conformance_checkpoint(tempfile.mkdtemp(prefix=f"d2f_conf_{name}_"), case)
    model = load_model(folder)
    eos = model.config.eos_token_id
    groups = _runs_by_params(case)

    def alone(decoder):
        out = []
        for cfg, runs in groups:
            for run in runs:
                o = decode(model, [run["prompt"]], cfg, decoder=decoder)
                out.append((o.tokens_before_eos(eos)[0], int(o.forwards[0])))
        return out

    def batched():
        out = []
        for cfg, runs in groups:
            o = decode(model, [r["prompt"] for r in runs], cfg)
            out += list(zip(o.tokens_before_eos(eos), o.forwards.tolist()))
        return out

    fns = {PATHS[0]: lambda: alone("d2f"), PATHS[1]: batched, PATHS[2]: lambda: alone("reference")}
    for fn in fns.values():
        fn()  # warm-up: the engine is built once, thread pools start
    seconds = {k: [] for k in fns}
    results = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            results[k] = fn()
            seconds[k].append(time.perf_counter() - t0)
    want = [(r["tokens_before_eos"], r["forwards"], r["eos"]) for _, runs in groups for r in runs]
    rows = []
    for k in fns:
        tokens = sum(len(t) for t, _ in results[k])
        forwards = sum(f for _, f in results[k])
        best = min(seconds[k])
        rows.append(dict(model=name, path=k, runs=len(want), generated_tokens=tokens, forwards=forwards,
                         seconds=best, tokens_per_s=tokens / best,
                         same_tokens_as_authors=[t for t, _ in results[k]] == [t for t, _, _ in want],
                         # after an EOS an engine may stop sooner than the authors' loop
                         same_forwards_as_authors=all(f <= w if e else f == w
                                                      for (_, f), (_, w, e) in zip(results[k], want))))
    ref = rows[-1]["tokens_per_s"]
    for r in rows:
        r["vs_reference"] = r["tokens_per_s"] / ref
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=CASES, help="folder of the conformance runs (llada.json, dream.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per path (the fastest counts)")
    p.add_argument("--out", default="results/conformance")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error(f"--repeat must be >= 1, got {a.repeat}")
    missing = [n for n in ("llada", "dream") if not os.path.isfile(os.path.join(a.cases, f"{n}.json"))]
    if missing:
        p.error(f"--cases {a.cases!r} holds no {missing[0]}.json (run from the repository's root, or pass --cases)")
    with torch_threads(a.threads):
        rows = [r for name in ("llada", "dream") for r in bench_case(a.cases, name, a.repeat)]
        threads = torch.get_num_threads()
    for r in rows:
        print(f"{r['model']:6} {r['path']:36} {r['tokens_per_s']:8.1f} tok/s {r['vs_reference']:5.2f}x "
              f"tokens ok={r['same_tokens_as_authors']} forwards ok={r['same_forwards_as_authors']}")
    write_json(os.path.join(a.out, "conformance.json"), {"env": environment(), "threads": threads, "rows": rows})
    write_markdown(os.path.join(a.out, "conformance.md"),
                   ["model", "path", "generated tokens", "forwards", "tokens / s", "vs reference loop",
                    "tokens and forwards as the authors' loop"],
                   [[r["model"], r["path"], r["generated_tokens"], r["forwards"], f"{r['tokens_per_s']:.1f}",
                     f"{r['vs_reference']:.2f}x",
                     "yes" if r["same_tokens_as_authors"] and r["same_forwards_as_authors"] else "no"]
                    for r in rows])
    plot(rows, os.path.join(a.out, "conformance.png"))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['model']}\n{r['path'].replace(', ', chr(10))}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("D2F on the conformance models: engine vs reference loop", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
