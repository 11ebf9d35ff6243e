"""D2F decode-step time on an 8B-shaped model with random bf16 weights, against the weight-read floor.

One representative step of the pipelined decoder: ``forward_window`` over a window of --blocks
blocks of --block-size tokens on a KV cache of --cache positions (committing one block to the
cache), ``unmask`` of its logits and the block-state update (``pipeline_step``). The floor is the
time to read every weight once (weight bytes / device copy bandwidth, measured here): at batch 1 a
step is memory-bound and cannot beat it. On CUDA the script also counts the host synchronisations
of an eager step, as run (none expected) and in debug mode (the ops' index value checks, see
d2f_ext.ops.set_debug_checks), and times the step replayed from a CUDA graph.

    python -m d2f_bench.step [--small] [--device cuda] [--batch 1 8] [--out results/step]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from d2f_bench.common import (
    building_on,
    copy_bandwidth,
    default_device,
    environment,
    interleaved,
    write_json,
    write_markdown,
)
from d2f_ext import layout as L
from d2f_ext import ops
from d2f_ext.models import KVCache, ModelConfig, model_for_config
from d2f_ext.pipeline import BlockPipeline

# The published LLaDA-8B-Instruct shapes; weights are random, only their size matters here.
LLADA_8B = dict(model_type="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                vocab_size=126464, embedding_size=126464, mask_token_id=126336, eos_token_id=126081,
                rope_theta=500000.0, max_sequence_length=4096, weight_tying=False, include_bias=False)
TINY = {**LLADA_8B, "d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 512,
        "vocab_size": 4096, "embedding_size": 4096, "mask_token_id": 4000, "eos_token_id": 4001}
BLOCK_ADD_THRESHOLD, DECODED_TOKEN_THRESHOLD, SKIP_THRESHOLD = 0.1, 0.95, 0.9


def make_step(model, batch: int, cache_len: int, blocks: int, block_size: int):
    """A closure running one decode step on fixed inputs. It restores the tokens and the pipeline
    state first, so every call (and every CUDA-graph replay) does the same work."""
    mc, device = model.config, next(model.parameters()).device
    W = blocks * block_size
    cache = KVCache.for_model(model, batch, cache_len + W)
    i32 = dict(dtype=torch.int32, device=device)
    cache_lens = torch.full((batch,), cache_len, **i32)
    commit = torch.full((batch,), block_size, **i32)
    pos = (cache_len + torch.arange(W, device=device)).expand(batch, W).contiguous()
    # Block 0 is the prompt, already in the cache; the window holds generation blocks 1..blocks.
    block_ids = (1 + torch.arange(W, device=device) // block_size).to(torch.int32).expand(batch, W).contiguous()
    pipe = BlockPipeline(cache_lens.clone(), (blocks + 2) * block_size, block_size, BLOCK_ADD_THRESHOLD, DECODED_TOKEN_THRESHOLD)
    rows0, blocks0 = pipe.rows.clone(), pipe.blocks.clone()
    rows, state = pipe.rows.clone(), pipe.blocks.clone()
    tokens0 = torch.full((batch, W), mc.mask_token_id, dtype=torch.long, device=device)
    tokens = tokens0.clone()

    def step():
        tokens.copy_(tokens0)
        rows.copy_(rows0)
        state.copy_(blocks0)
        logits = model.forward_window(tokens, pos, block_ids, cache, cache_lens, commit)
        counts, eos_block = ops.unmask(logits, tokens, block_ids, state[:, L.FULLY_ACTIVATED], mc.mask_token_id,
                                       eos_id=mc.eos_token_id, skip_threshold=SKIP_THRESHOLD)
        ops.pipeline_step(rows, state, counts, eos_block, block_size, BLOCK_ADD_THRESHOLD, DECODED_TOKEN_THRESHOLD)
        return logits

    kv_bytes = 2 * mc.num_layers * batch * cache_len * mc.num_kv_heads * mc.head_dim * cache.k.element_size()
    return step, kv_bytes


def host_syncs(fn, debug_checks: bool) -> int:
    """How many times fn makes the host wait for the GPU: each one forbids CUDA-graph capture."""
    torch.cuda.synchronize()
    previous = ops.set_debug_checks(debug_checks)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ops.set_debug_checks(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def graph_replay(fn):
    """fn captured in a CUDA graph; returns its replay. Warm-up runs on a side stream, as capture
    requires, so that lazy initialisation (cuBLAS handles, allocator pools) happens outside it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def weights_read_per_step(model) -> int:
    """Bytes of the weights a forward streams: all of them except the input embedding table, of
    which a forward gathers only the window's rows (unless tied to the output projection)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if model.config.tie_word_embeddings else total - emb.numel() * emb.element_size()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --small)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cache", type=int, default=512, help="cached positions before the window")
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the window")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay")
    ap.add_argument("--out", default="results/step")
    a = ap.parse_args()
    device = a.device or ("cpu" if a.small else default_device())
    cuda = torch.device(device).type == "cuda"
    cfg = ModelConfig.from_dict(TINY if a.small else LLADA_8B)
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
        model = model_for_config(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = weights_read_per_step(model)
    bandwidth = copy_bandwidth(device, 1 << 30 if cuda else 1 << 26)
    floor = weight_bytes / bandwidth
    print(f"model: {params / 1e6:,.1f}M params bf16 on {device}, weights read per step {weight_bytes / 2**20:,.1f} MiB; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> floor {floor * 1e3:.2f} ms")
    rows = []
    for B in a.batch:
        step, kv_bytes = make_step(model, B, a.cache, a.blocks, a.block_size)
        t = interleaved({"step": step}, warmup=3, repeat=a.repeat, device=device)["step"]
        row = dict(batch=B, window=a.blocks * a.block_size, cache=a.cache, step_ms=t * 1e3, floor_ms=floor * 1e3,
                   ratio=t / floor, kv_read_bytes=kv_bytes, floor_with_kv_ms=(weight_bytes + kv_bytes) / bandwidth * 1e3,
                   host_syncs=None, host_syncs_debug=None, graph_ms=None, graph_note="not CUDA" if not cuda else "")
        if cuda:
            row["host_syncs"] = host_syncs(step, debug_checks=False)
            row["host_syncs_debug"] = host_syncs(step, debug_checks=True)
            row["graph_ms"], row["graph_note"] = _graph_time(step, a)
        rows.append(row)
        print(f"batch {B}: step {row['step_ms']:.2f} ms, graph {_ms(row['graph_ms'])}, {row['ratio']:.2f}x the floor")
        del step
    print(f"\n{'batch':>5} {'step ms':>9} {'graph ms':>9} {'floor ms':>9} {'step/floor':>10} {'syncs':>5} "
          f"{'debug':>5}")
    for r in rows:
        print(f"{r['batch']:5d} {r['step_ms']:9.2f} {_ms(r['graph_ms']):>9} {r['floor_ms']:9.2f} {r['ratio']:10.2f} "
              f"{r['host_syncs']!s:>5} {r['host_syncs_debug']!s:>5}  {r['graph_note']}")
    write_json(os.path.join(a.out, "step.json"), {
        "env": environment(), "args": vars(a), "device": device, "config": cfg.to_dict(), "params": params,
        "weight_bytes_per_step": weight_bytes, "copy_bandwidth_Bps": bandwidth, "rows": rows})
    write_markdown(os.path.join(a.out, "step.md"),
                   ["batch", "window", "cache", "step ms", "CUDA graph ms", "floor ms (weights / bandwidth)",
                    "step / floor", "host syncs per eager step", "with debug checks"],
                   [[r["batch"], r["window"], r["cache"], f"{r['step_ms']:.2f}", _ms(r["graph_ms"]),
                     f"{r['floor_ms']:.2f}", f"{r['ratio']:.2f}", r["host_syncs"], r["host_syncs_debug"]]
                    for r in rows])
    plot(rows, os.path.join(a.out, "step.png"))
    print(f"wrote {a.out}/step.json, step.md and step.png")


def _graph_time(step, a):
    if a.no_graph:
        return None, "graph skipped (--no-graph)"
    try:
        replay = graph_replay(step)
    except RuntimeError as e:
        return None, f"capture failed: {str(e).splitlines()[0][:160]}"
    return interleaved({"graph": replay}, warmup=2, repeat=a.repeat, device="cuda")["graph"] * 1e3, "captured"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["step_ms"] for r in rows], 0.4, label="D2F step")
    ax.bar([x + 0.2 for x in xs], [r["floor_ms"] for r in rows], 0.4, label="weight-read floor")
    ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
