"""Vanilla LLaDA/Dream decoding: a fixed number of steps per block, low-confidence remasking,
a full bidirectional forward over the whole sequence every step, no KV cache. The baseline D2F
is measured against, and the teacher's decoder."""

from __future__ import annotations

from typing import Sequence

import torch

from .common import DecodeOutput, check_prompts


@torch.inference_mode()
def vanilla_decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                   block_size: int = 32, steps: int = 128) -> DecodeOutput:
    """Each block gets steps // (max_new_tokens // block_size) steps; a step decodes the block's
    most confident masked positions, as many as spread its masks evenly over its steps."""
    if block_size <= 0 or max_new_tokens <= 0 or max_new_tokens % block_size:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be a positive multiple of "
                         f"block_size ({block_size})")
    num_blocks = max_new_tokens // block_size
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({num_blocks})")
    mc = model.config
    prompts = check_prompts(prompts, mc.mask_token_id, mc.vocab_size, mc.max_position_embeddings,
                            max_new_tokens)
    device = next(model.parameters()).device
    B = len(prompts)
    plens = torch.tensor([len(p) for p in prompts], device=device)
    total = plens + max_new_tokens
    seq = torch.full((B, int(total.max())), mc.mask_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seq[b, : len(p)] = torch.tensor(p, device=device)
    cols = torch.arange(seq.shape[1], device=device)
    real = cols[None] < total[:, None]
    block_ids = torch.where(real, 0, -1).to(torch.int32)  # bidirectional; right padding unseen
    per_block = steps // num_blocks
    mask_col = torch.tensor([mc.mask_token_id], device=device)
    for k in range(num_blocks):
        lo = plens + k * block_size
        in_block = (cols[None] >= lo[:, None]) & (cols[None] < (lo + block_size)[:, None])
        for s in range(per_block):
            # Masks left / steps left, rounded up: spreads the block's masks evenly.
            masked = (seq == mc.mask_token_id) & in_block
            n = (masked.sum(1) + per_block - s - 1) // (per_block - s)
            logits = model(seq, block_ids=block_ids).float()
            if mc.logit_shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            probs = torch.softmax(logits, -1)
            p, tok = probs.index_fill(-1, mask_col, -1.0).max(-1)  # [MASK] is never a decoded token
            conf = torch.where(masked, p, float("-inf"))
            order = torch.sort(conf, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, cols.expand(B, -1))
            take = masked & (rank < n[:, None])
            seq = torch.where(take, tok, seq)
    gen = seq.gather(1, plens[:, None] + torch.arange(max_new_tokens, device=device))
    return DecodeOutput(gen, torch.full((B,), steps, dtype=torch.long))
