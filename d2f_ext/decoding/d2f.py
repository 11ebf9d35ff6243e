"""Pipelined D2F decoding on the d2f_ext ops.

Rows are stored compact and left-aligned (prompt without padding, then the generation blocks),
so a row's positions are its RoPE positions and its KV cache holds no padding. Each step is one
forward over the in-flight window, then unmask, then the block-state update that plans the next
window. Two ways to drive the steps:

- compact (the CPU default): before every step the host reads the plan, drops finished rows from
  the batch (``cache_rows``) and sizes the window to the widest one, so no work is wasted;
- static (the CUDA default): every row stays in the batch (a finished row's window is all
  padding) and the window width is fixed for ``sync_every`` steps, enough for the widest window
  those steps can plan (it grows by at most one block a step). A step then has fixed shapes and
  reads nothing on the host, so on CUDA it is captured once per width in a CUDA graph and
  replayed; the host reads the plan (finished? widest window?) once every ``sync_every`` steps.

Both give the same tokens and forwards (greedy); sampled rows are keyed by their batch index,
which the compact batch renumbers as rows finish.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import layout as L
from .. import ops
from ..config import D2FConfig
from ..models import KVCache
from ..pipeline import BlockPipeline, window_block_ids
from .common import DecodeOutput, check_prompts


class _Decode:
    """The state of one batch: sequences, KV cache, pipeline, Dream's carried logits."""

    def __init__(self, model, prompts: list[list[int]], cfg: D2FConfig, eos: Optional[int]):
        mc = model.config
        self.model, self.cfg, self.eos = model, cfg, eos
        self.device = next(model.parameters()).device
        B, bs = len(prompts), cfg.block_size
        self.plens = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        self.gen_len = cfg.max_blocks * bs
        self.seq_len = max(len(p) for p in prompts) + self.gen_len
        # One scratch column at seq_len absorbs the writes of window padding.
        self.seq = torch.full((B, self.seq_len + 1), mc.mask_token_id, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            self.seq[b, : len(p)] = torch.tensor(p, device=self.device)
        self.cache = KVCache.for_model(model, B, self.seq_len)
        self.pipe = BlockPipeline(self.plens, cfg.max_new_tokens, bs, cfg.block_add_threshold,
                                  cfg.decoded_token_threshold)
        self.prev_logits: Optional[torch.Tensor] = None  # [B, V] once the first forward ran
        self.steps = 0

    def step(self, W: int, live: Optional[torch.Tensor] = None) -> None:
        """One forward over windows of width ``W`` (>= every planned WIN_LEN), unmask, and the
        state update; over the rows ``live`` (compact) or every row (static: no host sync)."""
        mc, cfg = self.model.config, self.cfg
        rows, blocks, seq = self.pipe.rows, self.pipe.blocks, self.seq
        if live is not None:
            rows, blocks, seq = rows[live], blocks[live], seq[live]
        win_start = rows[:, L.WIN_START].contiguous()
        commit = rows[:, L.COMMIT_LEN].contiguous()
        block_ids = window_block_ids(rows, blocks, W)
        pos = win_start[:, None] + torch.arange(W, device=self.device, dtype=torch.int32)
        cols = torch.where(block_ids >= 0, pos, self.seq_len).long()
        tokens = seq.gather(1, cols)
        logits = self.model.forward_window(tokens, pos.long(), block_ids, self.cache, win_start, commit,
                                           cache_rows=None if live is None else live.to(torch.int32))
        if mc.logit_shift and self.prev_logits is None:
            self.prev_logits = logits.new_zeros(self.seq.shape[0], logits.shape[-1])
        prev = None
        if mc.logit_shift:
            prev = self.prev_logits if live is None else self.prev_logits[live]
        counts, eos_block = ops.unmask(
            logits, tokens, block_ids, blocks[:, L.FULL], mc.mask_token_id, prev_logits=prev,
            eos_id=-1 if self.eos is None else self.eos, threshold=cfg.skip_threshold,
            temperature=cfg.temperature, sampling_strategy=cfg.sampling_strategy,
            seed=cfg.seed + self.steps, top_k=cfg.top_k, top_p=cfg.top_p)
        seq.scatter_(1, cols, tokens)
        if mc.logit_shift:
            # The logits of a committed span's last position predict the next window's first.
            n = commit.long()
            last = logits[torch.arange(n.shape[0], device=self.device), (n - 1).clamp(min=0)]
            prev = torch.where((n > 0)[:, None], last.to(prev.dtype), prev)
        if live is None:
            if prev is not None:
                self.prev_logits.copy_(prev)
        else:
            self.seq[live] = seq
            if prev is not None:
                self.prev_logits[live] = prev
            B = self.seq.shape[0]
            counts = counts.new_zeros(B, counts.shape[1]).index_copy_(0, live, counts)
            eos_block = eos_block.new_full((B,), -1).index_copy_(0, live, eos_block)
        self.pipe.step(counts, eos_block)
        self.steps += 1

    def generated(self) -> torch.Tensor:
        cols = self.plens.long()[:, None] + torch.arange(self.gen_len, device=self.device)
        return self.seq.gather(1, cols)


class _GraphedSteps:
    """Runs the static step of each window width eagerly once (which also makes the ops' host-side
    value checks), then captures it in a CUDA graph and replays that graph from then on. The
    graphs share one memory pool; every tensor they touch lives as long as the decode."""

    def __init__(self, run):
        self.run, self.graphs, self.warm, self.pool = run, {}, set(), None

    def __call__(self, W: int) -> None:
        graph = self.graphs.get(W)
        if graph is None and W not in self.warm:
            self.run(W)
            self.warm.add(W)
            return
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.run(W)  # recorded, not run
            self.pool = graph.pool()
            self.graphs[W] = graph
        graph.replay()


@torch.inference_mode()
def d2f_decode(model, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *, eos_id: int | None = None,
               on_step=None, static: Optional[bool] = None, sync_every: int = 4,
               cuda_graphs: Optional[bool] = None) -> DecodeOutput:
    """Decode every prompt (lists of real token ids) with D2F; see :class:`D2FConfig`.

    on_step(generated [B, max_new], rows) is called after every step, for streaming. static:
    drive the steps with fixed shapes (default: on CUDA), reading the plan on the host every
    ``sync_every`` steps; cuda_graphs: replay those steps as CUDA graphs (default: static on
    CUDA with greedy decoding; the sampling seed advances every step, which a graph would freeze).
    """
    mc = model.config
    eos = mc.eos_token_id if eos_id is None else eos_id
    prompts = check_prompts(prompts, mc.mask_token_id, mc.vocab_size, mc.max_position_embeddings,
                            cfg.max_new_tokens)
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    d = _Decode(model, prompts, cfg, eos)
    on_cuda = d.device.type == "cuda"
    static = on_cuda if static is None else static
    greedy = cfg.temperature == 0
    cuda_graphs = static and on_cuda and greedy if cuda_graphs is None else cuda_graphs
    if cuda_graphs and not (static and on_cuda and greedy):
        raise ValueError("cuda_graphs needs static=True, a CUDA model and greedy decoding (temperature 0)")

    def after_step():
        if on_step is not None:
            on_step(d.generated(), d.pipe.rows)

    if not static:
        while True:
            rows = d.pipe.rows
            live = torch.nonzero(rows[:, L.FINISHED] == 0)[:, 0]
            if live.numel() == 0:
                break
            d.step(int(rows[live, L.WIN_LEN].max()), live)
            after_step()
    else:
        run = _GraphedSteps(d.step) if cuda_graphs else d.step
        bs, interval = cfg.block_size, 1  # the first forward (prompts + block 1) on its own
        while True:
            plan = d.pipe.rows[:, [L.FINISHED, L.WIN_LEN]].cpu()  # the interval's one host sync
            if bool(plan[:, 0].all()):
                break
            widest = int(plan[:, 1].max()) + (interval - 1) * bs
            # Whole blocks (fewer distinct widths, so fewer graphs), never past the sequence.
            W = min(-(-widest // bs) * bs if interval > 1 else widest, d.seq_len)
            for _ in range(interval):
                run(W)
                after_step()
            interval = sync_every
    return DecodeOutput(d.generated(), d.pipe.rows[:, L.FORWARDS].long())
