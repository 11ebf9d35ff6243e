"""End-to-end decoding benchmark: D2F on the kernels (compact steps, fixed-shape steps and, on CUDA,
fixed-shape steps replayed as CUDA graphs), Fast-dLLM mode, vanilla decoding and the plain-PyTorch
reference D2F loop, on one small random model, in one run.

For each decoder: generated tokens (before EOS), forwards, tokens per forward (TPF) and tokens/s
(generated tokens only), over the same prompts; decoders alternate prompt by prompt so that
machine noise hits all alike. Prints a table, writes JSON and a plot.

    python -m d2f_bench.decode [--arch llada] [--hidden 512 --layers 4] [--prompts 8] [--device cuda] [--out results/decode]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

from d2f_bench.common import environment, write_json, write_markdown
from d2f_bench.tiny import write_tiny_checkpoint
from d2f_ext import D2FConfig
from d2f_ext.decoding import d2f_decode, decode
from d2f_ext.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["llada", "dream"], default="llada")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--block-add-threshold", type=float, default=0.1)
    ap.add_argument("--decoded-token-threshold", type=float, default=0.95)
    ap.add_argument("--skip-threshold", type=float, default=0.9)
    ap.add_argument("--vanilla-steps", type=int, default=0, help="default: max-new-tokens (one token a step)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/decode")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = tempfile.mkdtemp(prefix="d2f_bench_")
    write_tiny_checkpoint(folder, arch=a.arch, seed=0, vocab=a.vocab, hidden_size=a.hidden, num_heads=a.heads,
                          num_layers=a.layers, intermediate_size=4 * a.hidden, max_len=1024)
    model = load_model(folder, device=a.device)
    params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    specials = {model.config.mask_token_id, model.config.eos_token_id}
    vocab = [t for t in range(model.config.vocab_size) if t not in specials]
    prompts = [[rng.choice(vocab) for _ in range(rng.randint(16, 48))] for _ in range(a.prompts)]
    cfg = D2FConfig(block_size=a.block_size, block_add_threshold=a.block_add_threshold,
                    decoded_token_threshold=a.decoded_token_threshold, skip_threshold=a.skip_threshold,
                    max_new_tokens=a.max_new_tokens)
    steps = a.vanilla_steps or a.max_new_tokens
    decoders = {name: (lambda p, name=name: decode(model, [p], cfg, decoder=name,
                                                   steps=steps if name == "vanilla" else None))
                for name in ("d2f", "fast-dllm", "reference", "vanilla")}
    decoders["d2f-static"] = lambda p: d2f_decode(model, [p], cfg, static=True, cuda_graphs=False)
    if torch.device(a.device).type == "cuda":
        decoders["d2f-cuda-graphs"] = lambda p: d2f_decode(model, [p], cfg, static=True, cuda_graphs=True)
    eos = model.config.eos_token_id
    stats = {k: dict(tokens=0, forwards=0, seconds=0.0) for k in decoders}
    for fn in decoders.values():
        fn(prompts[0])  # warm-up (thread pools, allocator, cuBLAS handles)
    outputs = {k: [] for k in decoders}
    for i, p in enumerate(prompts):
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            out = fn(p)
            if torch.device(a.device).type == "cuda":
                torch.cuda.synchronize()
            stats[name]["seconds"] += time.perf_counter() - t0
            toks = out.tokens_before_eos(eos)[0]
            outputs[name].append(toks)
            stats[name]["tokens"] += len(toks)
            stats[name]["forwards"] += int(out.forwards[0])
        print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    rows = []
    for name, s in stats.items():
        rows.append(dict(decoder=name, generated_tokens=s["tokens"], forwards=s["forwards"],
                         forwards_per_sequence=s["forwards"] / len(prompts),
                         tokens_per_forward=s["tokens"] / max(s["forwards"], 1),
                         tokens_per_s=s["tokens"] / s["seconds"], seconds=s["seconds"]))
    base = next(r for r in rows if r["decoder"] == "vanilla")["tokens_per_s"]
    print(f"\nmodel: {a.arch} hidden={a.hidden} layers={a.layers} params={params / 1e6:.1f}M, "
          f"{len(prompts)} prompts, max_new_tokens={a.max_new_tokens}, block_size={a.block_size}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'decoder':15} {'tokens':>7} {'fwd/seq':>8} {'TPF':>6} {'tok/s':>8} {'vs vanilla':>10}")
    for r in rows:
        print(f"{r['decoder']:15} {r['generated_tokens']:7d} {r['forwards_per_sequence']:8.1f} "
              f"{r['tokens_per_forward']:6.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base:9.2f}x")
    same = all(outputs[k] == outputs["reference"] for k in decoders if k.startswith("d2f"))
    print(f"kernel path == reference loop on every prompt: {same}")
    write_json(os.path.join(a.out, "decode.json"), {"env": environment(), "args": vars(a), "params": params,
                                                   "rows": rows, "kernel_equals_reference": same})
    write_markdown(os.path.join(a.out, "decode.md"),
                   ["decoder", "generated tokens", "forwards / sequence", "tokens / forward", "tokens / s", "vs vanilla"],
                   [[r["decoder"], r["generated_tokens"], f"{r['forwards_per_sequence']:.1f}",
                     f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base:.2f}x"]
                    for r in rows])
    plot(rows, os.path.join(a.out, "decode.png"))
    print(f"wrote {a.out}/decode.json, decode.md and decode.png")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["decoder"] for r in rows]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows])
    axes[0].set_ylabel("generated tokens / s")
    axes[1].bar(names, [r["tokens_per_forward"] for r in rows])
    axes[1].set_ylabel("tokens per forward")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
