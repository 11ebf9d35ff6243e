"""Kernel benchmark: d2f_ext ops against what a user would write in plain PyTorch, in one run.

attention: d2f_ext.ops.attention vs torch SDPA fed with torch.cat(cache, window) and an explicit
  block-causal boolean mask (LLaDA-8B per-layer shapes: 32 heads, head_dim 128). On CUDA, SDPA
  runs pinned to each backend in turn (flash, cuDNN, memory-efficient); a backend that refuses
  the inputs is recorded as unsupported and the ratio is taken against the fastest supported one.
unmask:    d2f_ext.ops.unmask vs torch softmax + max + threshold at the LLaDA and Dream vocabularies.
CPU runs float32 and bfloat16 on a few shapes; CUDA runs bfloat16 on the full LLaDA-8B grid
(W 32..128, cache 256..8192, batch 1..16). Prints a table of ratios (torch time / d2f_ext time;
> 1 means d2f_ext is faster) and writes JSON, markdown and a plot.
    python -m d2f_bench.kernels [--small] [--device cuda] [--out results/kernels]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from d2f_bench.common import (
    default_device,
    environment,
    interleaved,
    write_json,
    write_markdown,
)
from d2f_ext import ops

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _randn(g, shape, dtype, device):
    # Drawn on the target device: the CUDA grid's caches (up to 2^30 values) would take minutes on a CPU.
    return torch.randn(*shape, generator=g, device=device).to(dtype)


def attention_case(B, W, cache, H, Hkv, D, block, dtype, device, backends=None):
    """Timed fns: "ours" and "torch_sdpa" (SDPA's own backend choice), or with ``backends`` one
    "sdpa_<name>" per backend that accepts the inputs; and the largest |ours - torch| seen."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: _randn(g, s, dtype, device)  # noqa: E731
    q, k, v = mk(B, W, H, D), mk(B, W, Hkv, D), mk(B, W, Hkv, D)
    kc, vc = mk(B, cache, Hkv, D), mk(B, cache, Hkv, D)
    lens = torch.full((B,), cache, dtype=torch.int32, device=device)
    bids = (torch.arange(W, device=device) // block).to(torch.int32).expand(B, W).contiguous()
    bid = bids[0]
    mask = torch.cat([torch.ones(W, cache, dtype=torch.bool, device=device), bid[None, :] <= bid[:, None]], 1)

    def ours():
        return ops.attention(q, k, v, kc, vc, lens, bids)

    def sdpa():
        keys = torch.cat([kc, k], 1).transpose(1, 2)
        vals = torch.cat([vc, v], 1).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask,
                                              enable_gqa=H != Hkv).transpose(1, 2)

    fns = {"ours": ours}
    if backends is None:
        fns["torch_sdpa"] = sdpa
    else:
        for name, backend in backends.items():
            pinned = _pinned(backend, sdpa)
            if _accepts(pinned):
                fns[f"sdpa_{name}"] = pinned
    out = ours().float()
    err = max((out - fn().float()).abs().max().item() for k, fn in fns.items() if k != "ours")
    return fns, err


def _pinned(backend, fn):
    def run():
        with sdpa_kernel(backend):
            return fn()
    return run


def _accepts(fn) -> bool:
    """Whether SDPA runs fn's inputs under its pinned backend: one that cannot (flash with an
    explicit mask, cuDNN on some shapes) raises "No available kernel" after a warning per reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        return True
    except RuntimeError:
        return False


def unmask_case(B, W, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, W, V, generator=g, device=device) * 4).to(dtype)
    mask_id = V - 1
    tokens = torch.full((B, W), mask_id, dtype=torch.long, device=device)
    bids = torch.zeros(B, W, dtype=torch.int32, device=device)
    fully_activated = torch.ones(B, 1, dtype=torch.int32, device=device)

    def ours():
        return ops.unmask(logits, tokens.clone(), bids, fully_activated, mask_id, skip_threshold=0.9)

    def torch_path():
        t = tokens.clone()
        masked = t == mask_id
        p, tok = torch.softmax(logits.float(), -1).max(-1)
        decode = masked & (p > 0.9)
        return torch.where(decode, tok, t)

    return {"ours": ours, "torch": torch_path}, 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a few small shapes (smoke run)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="results/kernels")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == "cuda"
    dtypes = [torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    att_shapes, um_shapes = shapes(a.small, cuda)
    backends = SDPA_BACKENDS if cuda else None
    rows = []
    print(f"{'op':9} {'dtype':9} {'shape':44} {'ours ms':>9} {'torch ms':>9} {'ratio':>6}")
    for dtype in dtypes:
        for (B, W, c, H, Hkv, D, blk) in att_shapes:
            fns, err = attention_case(B, W, c, H, Hkv, D, blk, dtype, a.device, backends)
            if len(fns) == 1:
                print(f"attention B={B} W={W} cache={c}: no SDPA backend accepts the inputs; skipped")
                continue
            t = interleaved(fns, repeat=a.repeat, device=a.device)
            best = min((k for k in t if k != "ours"), key=t.get)
            row = dict(op="attention", dtype=str(dtype)[6:], B=B, W=W, cache=c, heads=H, kv_heads=Hkv,
                       head_dim=D, block=blk, ours_ms=t["ours"] * 1e3, torch_ms=t[best] * 1e3,
                       ratio=t[best] / t["ours"], max_abs_diff=err)
            if backends:
                # None marks a backend that refused the inputs.
                row.update(best_backend=best[len("sdpa_"):],
                           sdpa_ms={n: t[f"sdpa_{n}"] * 1e3 if f"sdpa_{n}" in t else None for n in backends})
            rows.append(row)
        for (B, W, V) in um_shapes:
            fns, _ = unmask_case(B, W, V, dtype, a.device)
            t = interleaved(fns, repeat=a.repeat, device=a.device)
            rows.append(dict(op="unmask", dtype=str(dtype)[6:], B=B, W=W, vocab=V, ours_ms=t["ours"] * 1e3,
                             torch_ms=t["torch"] * 1e3, ratio=t["torch"] / t["ours"]))
    for r in rows:
        print(f"{r['op']:9} {r['dtype']:9} {_shape(r):44} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} {r['ratio']:6.2f}")
    for op in ("attention", "unmask"):
        ratios = [r["ratio"] for r in rows if r["op"] == op]
        print(f"{op}: ratio min {min(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}, max {max(ratios):.2f}")
    write_json(os.path.join(a.out, "kernels.json"), {"env": environment(), "rows": rows})
    write_markdown(os.path.join(a.out, "kernels.md"), ["op", "dtype", "shape", "d2f_ext ms", "torch ms", "torch / d2f_ext"],
                   [[r["op"], r["dtype"], _shape(r), f"{r['ours_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['ratio']:.2f}"]
                    for r in rows])
    if backends:
        backend_table(rows, list(backends), os.path.join(a.out, "kernels_sdpa_backends.md"))
    plot(rows, os.path.join(a.out, "kernels.png"))
    print(f"wrote {a.out}/kernels.json, kernels.md and kernels.png")


def shapes(small: bool, cuda: bool):
    """(attention shapes (B, W, cache, H, Hkv, D, block), unmask shapes (B, W, V))."""
    llada_vocabs = (126464, 151936)
    if cuda:
        grid = [(B, W, c) for B in (1, 4, 8, 16) for W in (32, 64, 128) for c in (256, 512, 1024, 2048, 4096, 8192)]
        if small:
            grid = [(1, 32, 256), (8, 64, 2048)]
        um = [(B, W, V) for V in llada_vocabs for B in (1, 8, 16) for W in (32, 128)]
        return [(B, W, c, 32, 32, 128, 32) for B, W, c in grid], um[:1] if small else um
    if small:
        return [(1, 32, 256, 8, 8, 64, 16)], [(1, 32, 32000)]
    return ([(1, W, c, 32, 32, 128, 32) for W in (32, 64, 128) for c in (256, 1024, 4096)],
            [(B, W, V) for V in llada_vocabs for B in (1, 8) for W in (32, 128)])


def backend_table(rows, names, path):
    """Attention against each SDPA backend, printed and written as markdown."""
    att = [r for r in rows if r["op"] == "attention"]
    cell = lambda ms: "unsupported" if ms is None else f"{ms:.3f}"  # noqa: E731
    header = ["shape", "d2f_ext ms"] + [f"{n} ms" for n in names] + ["best", "best / d2f_ext"]
    table = [[_shape(r), f"{r['ours_ms']:.3f}"] + [cell(r["sdpa_ms"][n]) for n in names]
             + [r["best_backend"], f"{r['ratio']:.2f}"] for r in att]
    print("\nattention against each SDPA backend (cat + mask):")
    print(" | ".join(header))
    for line in table:
        print(" | ".join(line))
    write_markdown(path, header, table)


def _shape(r) -> str:
    if r["op"] == "attention":
        return f"B={r['B']} W={r['W']} cache={r['cache']} H={r['heads']} D={r['head_dim']}"
    return f"B={r['B']} W={r['W']} V={r['vocab']}"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(max(12.0, 0.15 * len(rows)), 4))
    for ax, op in zip(axes, ("attention", "unmask")):
        sel = [r for r in rows if r["op"] == op]
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        labels = [(f"{short[r['dtype']]} W{r['W']} c{r['cache']}" + (f" B{r['B']}" if r["B"] != 1 else "")
                   if op == "attention"
                   else f"{short[r['dtype']]} B{r['B']} W{r['W']} V{r['vocab'] // 1000}k") for r in sel]
        ax.bar(range(len(sel)), [r["ratio"] for r in sel])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(sel)), labels, rotation=70, fontsize=7)
        ax.set_ylabel("torch time / d2f_ext time")
        ax.set_title(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
