"""The D2F loop in plain PyTorch, written straight from the spec with Python block records.

It shares no decoding code with the kernel path (no _C, no pipeline op, no unmask op): attention
runs through d2f_ext.reference, one row at a time, so the kernel path can be checked against it
token for token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import layout as L
from .. import reference
from ..config import D2FConfig
from ..models import KVCache
from .common import DecodeOutput, check_prompts


def _filtered(rows: torch.Tensor, cfg: D2FConfig) -> tuple[torch.Tensor, float]:
    """Temperature, then top-p, then top-k, as the spec orders them."""
    x = rows.float()
    if cfg.temperature > 0:
        x = x / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, -1).cumsum(-1)
        drop = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool), cum[..., :-1] > cfg.top_p], -1)
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if cfg.top_k:
        kth = torch.topk(x, min(cfg.top_k, x.shape[-1])).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return x, (1.0 if cfg.temperature > 0 else 0.0)


@torch.inference_mode()
def reference_decode(model, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *,
                     eos_id: int | None = None) -> DecodeOutput:
    mc = model.config
    eos = mc.eos_token_id if eos_id is None else eos_id
    prompts = check_prompts(prompts, mc.mask_token_id, mc.vocab_size, mc.max_position_embeddings,
                            cfg.max_new_tokens)
    gen_len = cfg.gen_len
    generated, forwards = [], []
    for p in prompts:
        g, f = _decode_row(model, p, cfg, eos)
        generated.append(g + [mc.mask_token_id] * (gen_len - len(g)))
        forwards.append(f)
    return DecodeOutput(torch.tensor(generated, dtype=torch.long), torch.tensor(forwards))


def _decode_row(model, prompt: list[int], cfg: D2FConfig, eos: int | None):
    mc = model.config
    device = next(model.parameters()).device
    bs, mask = cfg.block_size, mc.mask_token_id
    seq = list(prompt)
    blocks = [dict(start=0, len=len(prompt), masked=0, state="to_cache", fully_activated=True)]
    cache = KVCache.for_model(model, 1, len(prompt) + cfg.gen_len)
    cache_len, prev_logits, eos_seen, forwards = 0, None, False, 0
    conf_kind = L.CONFIDENCES[cfg.sampling_strategy]

    def fraction(b):
        return (b["len"] - b["masked"]) / b["len"]

    while True:
        # 1. add
        left = len(prompt) + cfg.gen_len - len(seq)
        if left > 0 and not eos_seen and fraction(blocks[-1]) >= cfg.block_add_threshold:
            size = min(bs, left)
            blocks.append(dict(start=len(seq), len=size, masked=size, state="active", fully_activated=False))
            seq += [mask] * size
        # 2. activate
        for i in range(len(blocks) - 1):
            if fraction(blocks[i]) >= cfg.decoded_token_threshold:
                blocks[i + 1]["fully_activated"] = True
        # 3. done; after an EOS, once every block up to the one holding the first EOS is decoded
        # (later blocks cannot change the output: nothing attends to them)
        if eos_seen:
            first = seq.index(eos, len(prompt))
            holder = next(i for i, b in enumerate(blocks) if b["start"] <= first < b["start"] + b["len"])
            if not any(b["masked"] for b in blocks[: holder + 1]):
                break
        elif all(b["state"] != "active" for b in blocks) and not any(b["masked"] for b in blocks):
            break
        # 4. window
        to_cache = [b for b in blocks if b["state"] == "to_cache"]
        start = cache_len
        commit = sum(b["len"] for b in to_cache)
        window = seq[start:]
        block_of = []
        for i, b in enumerate(blocks):
            block_of += [i] * b["len"]
        ids = torch.tensor([window], device=device)
        bids = torch.tensor([block_of[start:]], dtype=torch.int32, device=device)
        positions = torch.arange(start, len(seq), device=device)[None]
        logits = model.forward_window(ids, positions, bids, cache, torch.tensor([start], dtype=torch.int32),
                                      torch.tensor([commit], dtype=torch.int32), impl=reference)[0]
        forwards += 1
        for b in to_cache:
            b["state"] = "in_cache"
        cache_len = start + commit
        # 5. logits of each window position (Dream: shifted right by one)
        raw = logits
        if mc.logit_shift:
            first_row = prev_logits if prev_logits is not None else torch.zeros_like(logits[0])
            logits = torch.cat([first_row[None], logits[:-1]])
            if commit > 0:
                prev_logits = raw[commit - 1]
        # 6. unmask
        x, temperature = _filtered(logits, cfg)
        noise = None
        if temperature > 0:
            noise = reference.gumbel_noise(cfg.seed + forwards - 1, 1, len(window), x.shape[-1], x.device)[0]
        token, p, conf = reference.token_stats(x, temperature, conf_kind, noise, mask)
        thr = torch.tensor(cfg.skip_threshold, dtype=torch.float32)
        for i, b in enumerate(blocks):
            if b["state"] != "active":
                continue
            pos = [q for q in range(b["start"], b["start"] + b["len"]) if seq[q] == mask]
            if not pos:
                continue
            w = [q - start for q in pos]
            chosen = [q for q, wq in zip(pos, w) if bool(p[wq] > thr)]
            if not chosen and b["fully_activated"]:
                chosen = [pos[int(torch.stack([conf[wq] for wq in w]).argmax())]]
            for q in chosen:
                seq[q] = int(token[q - start])
                eos_seen |= eos is not None and seq[q] == eos
            b["masked"] -= len(chosen)
        # 7. finish blocks
        earlier_active = False
        for b in blocks:
            if b["state"] == "active" and b["masked"] == 0 and not earlier_active:
                b["state"] = "to_cache"
            earlier_active |= b["state"] == "active"
    return seq[len(prompt):], forwards
