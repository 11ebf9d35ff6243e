"""Pipelined D2F decoding on the d2f_ext ops.

Rows are stored compact and left-aligned (prompt without padding, then the generation blocks),
so a row's positions are its RoPE positions and its KV cache holds no padding. Each step is one
forward over the in-flight window of every unfinished row (finished rows drop out of the batch
through `cache_rows`), then unmask, then the block-state update that plans the next window.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import layout as L
from .. import ops
from ..config import D2FConfig
from ..models import KVCache
from ..pipeline import BlockPipeline, window_block_ids
from .common import DecodeOutput, check_prompts


@torch.inference_mode()
def d2f_decode(model, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *, eos_id: int | None = None,
               on_step=None) -> DecodeOutput:
    """Decode every prompt (lists of real token ids) with D2F; see :class:`D2FConfig`.

    on_step(generated [B, max_new], rows) is called after every step, for streaming."""
    mc = model.config
    eos = mc.eos_token_id if eos_id is None else eos_id
    prompts = check_prompts(prompts, mc.mask_token_id, mc.vocab_size, mc.max_position_embeddings,
                            cfg.max_new_tokens)
    device = next(model.parameters()).device
    B, bs = len(prompts), cfg.block_size
    plens = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    gen_len = cfg.max_blocks * bs
    seq_len = int(plens.max()) + gen_len
    # One scratch column at seq_len absorbs the writes of window padding.
    seq = torch.full((B, seq_len + 1), mc.mask_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seq[b, : len(p)] = torch.tensor(p, device=device)
    cache = KVCache.for_model(model, B, seq_len)
    prev_logits = None
    pipe = BlockPipeline(plens, cfg.max_new_tokens, bs, cfg.block_add_threshold,
                         cfg.decoded_token_threshold)
    counts = torch.zeros(B, cfg.max_blocks + 1, dtype=torch.int32, device=device)
    eos_block = torch.full((B,), -1, dtype=torch.int32, device=device)
    step = 0
    while True:
        rows = pipe.rows
        live = torch.nonzero(rows[:, L.FINISHED] == 0)[:, 0]
        if live.numel() == 0:
            break
        r, blocks = rows[live], pipe.blocks[live]
        win_start = r[:, L.WIN_START]
        W = int(r[:, L.WIN_LEN].max())
        block_ids = window_block_ids(r, blocks, W)
        pos = win_start[:, None] + torch.arange(W, device=device, dtype=torch.int32)
        cols = torch.where(block_ids >= 0, pos, seq_len).long()
        tokens = seq[live].gather(1, cols)
        logits = model.forward_window(tokens, pos.long(), block_ids, cache, win_start.contiguous(),
                                      r[:, L.COMMIT_LEN].contiguous(), cache_rows=live.to(torch.int32))
        if mc.logit_shift and prev_logits is None:
            prev_logits = logits.new_zeros(B, logits.shape[-1])
        c, e = ops.unmask(logits, tokens, block_ids, blocks[:, L.FULL], mc.mask_token_id,
                          prev_logits=prev_logits[live] if mc.logit_shift else None,
                          eos_id=-1 if eos is None else eos, threshold=cfg.skip_threshold,
                          temperature=cfg.temperature, sampling_strategy=cfg.sampling_strategy,
                          seed=cfg.seed + step, top_k=cfg.top_k, top_p=cfg.top_p)
        seq[live] = seq[live].scatter(1, cols, tokens)
        if mc.logit_shift:
            # The logits of a committed span's last position predict the next window's first.
            commit = r[:, L.COMMIT_LEN].long()
            has = commit > 0
            last = logits[torch.arange(len(live), device=device), (commit - 1).clamp(min=0)]
            prev_logits[live[has]] = last[has].to(prev_logits.dtype)
        counts.zero_()
        eos_block.fill_(-1)
        counts[live] = c
        eos_block[live] = e
        pipe.step(counts, eos_block)
        step += 1
        if on_step is not None:
            on_step(_generated(seq, plens, gen_len), pipe.rows)
    return DecodeOutput(_generated(seq, plens, gen_len), pipe.rows[:, L.FORWARDS].long())


def _generated(seq: torch.Tensor, plens: torch.Tensor, gen_len: int) -> torch.Tensor:
    cols = plens.long()[:, None] + torch.arange(gen_len, device=seq.device)
    return seq.gather(1, cols)
