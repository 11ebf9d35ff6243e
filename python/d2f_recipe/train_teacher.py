"""Pretrain a small LLaDA-architecture masked-diffusion model from scratch on the math task.

Objective: per example t ~ U(0, 1), mask ratio p = (1 - eps) t + eps; every response token is
masked with probability p (the prompt never is); the loss is the cross-entropy on the masked
positions. ``--weighting elbo`` is LLaDA's exact form (each position's loss divided by p, summed
over the response and divided by its length, averaged over the batch); the default ``tokens``
averages over the batch's masked positions instead. Both have the same minimiser (the clean
token's distribution given the visible ones, at every ratio); ``tokens`` drops the 1/p factor
whose variance slows a small model down: at 300 steps it had 0.54 against 0.47 accuracy on
held-out masked tokens at ratio 0.5. The output folder is a checkpoint
d2f_ext.models.load_model reads.

    python -m d2f_recipe.train_teacher --out runs/teacher --hidden 256 --layers 4 --steps 6000
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from d2f_bench.tiny import llada_config
from d2f_ext.models import ModelConfig, model_for_config
from d2f_recipe import training as tc

WEIGHTINGS = ("tokens", "elbo")


def semi_ar_masks(batch: tc.Batch, p: torch.Tensor, block_size: int, gen: torch.Generator):
    """(masked, scored) [B, L] bool for the states semi-autoregressive decoding visits: a clean
    prefix of the response (cut uniformly), one block of ``block_size`` positions each masked with
    ratio ``p``, every later position masked. Only the block is scored: the decoder never reads
    the later blocks' predictions while they are all masks."""
    B, L = batch.ids.shape
    resp, pos = batch.response(), batch.positions()
    cut = batch.prompt_len + (torch.rand(B, generator=gen).to(resp.device) * resp.sum(1)).long()
    block = (pos >= cut[:, None]) & (pos < cut[:, None] + block_size)
    scored = resp & block & (torch.rand(B, L, generator=gen).to(resp.device) < p[:, None])
    return scored | (resp & (pos >= cut[:, None] + block_size)), scored


def diffusion_loss(model, batch: tc.Batch, mask_id: int, eps: float, gen: torch.Generator,
                   weighting: str = "tokens", block_ids: Optional[torch.Tensor] = None,
                   semi_ar_share: float = 0.0, block_size: int = 16, ar_share: float = 0.0) -> torch.Tensor:
    """The masked-diffusion loss of one batch; ``block_ids`` (default: fully bidirectional over the
    real tokens) lets adapt_ar anneal the attention. A ``semi_ar_share`` of the examples is noised
    by :func:`semi_ar_masks` instead of independently."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    B, L = batch.ids.shape
    resp = batch.response()
    t = torch.rand(B, generator=gen).to(resp.device)
    p = (1 - eps) * t + eps
    masked = resp & (torch.rand(B, L, generator=gen).to(resp.device) < p[:, None])
    scored = masked
    if semi_ar_share > 0:
        semi = (torch.rand(B, generator=gen) < semi_ar_share).to(resp.device)[:, None]
        semi_masked, semi_scored = semi_ar_masks(batch, p, block_size, gen)
        masked = torch.where(semi, semi_masked, masked)
        scored = torch.where(semi, semi_scored, scored)
    if block_ids is None:  # batch padding (-1) is never attended
        block_ids = torch.where(batch.real(), 0, -1).to(torch.int32)
    ar = None
    if ar_share > 0:
        if not model.config.logit_shift:
            raise ValueError("ar_share needs a model whose position p - 1 predicts token p (logit_shift)")
        ar = (torch.rand(B, generator=gen) < ar_share).to(resp.device)[:, None]
        masked, scored = masked & ~ar, scored & ~ar
        causal = torch.where(batch.real(), batch.positions(), -1).to(torch.int32)
        block_ids = torch.where(ar, causal, block_ids)
    noised = torch.where(masked, mask_id, batch.ids)
    logits = model(noised, block_ids=block_ids)
    if model.config.logit_shift:
        logits = tc.shift_logits(logits)
    extra = 0.0
    if ar is not None:  # clean rows under a causal mask: the AR model's next-token loss
        next_token = resp & ar
        extra = F.cross_entropy(logits[next_token].float(), batch.ids[next_token], reduction="sum") / \
            next_token.sum().clamp(min=1)
    ce = F.cross_entropy(logits[scored].float(), batch.ids[scored], reduction="none")
    if weighting == "tokens":
        return ce.sum() / scored.sum().clamp(min=1) + extra
    weight = (1.0 / (p[:, None] * resp.sum(1, keepdim=True))).expand(B, L)[scored]
    return (ce * weight).sum() / B + extra


def build_model(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_len: int):
    config = llada_config(len(tokenizer), tokenizer.mask_token_id, tokenizer.eos_token_id, hidden,
                           heads, heads, layers, intermediate, max_len, False)
    config["pad_token_id"] = tokenizer.pad_token_id
    model = model_for_config(ModelConfig.from_dict(config))
    tc.init_weights(model, layers)
    return model


DIFFUSION_COUNTS = {"gen_len": 1, "block_size": 1}  # the minimums of add_diffusion_args's counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tc.add_pretraining_args(p, steps=6000)
    add_diffusion_args(p)
    a = p.parse_args(argv)
    tc.check_pretraining_args(p, a, **DIFFUSION_COUNTS)
    return a


def add_diffusion_args(p) -> None:
    """The objective's arguments, shared with adapt_ar."""
    p.add_argument("--gen-len", type=int, default=64, help="response canvas, filled with EOS")
    p.add_argument("--eps", type=float, default=1e-3, help="smallest mask ratio")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="tokens",
                   help="tokens: mean over masked positions; elbo: LLaDA's 1/ratio weights")
    p.add_argument("--semi-ar-share", type=float, default=0.0,
                   help="share of examples noised as semi-autoregressive decoding sees them: clean "
                   "prefix, one partly masked block, masked suffix")
    p.add_argument("--block-size", type=int, default=16, help="the partly masked block of --semi-ar-share")
    p.add_argument("--ar-share", type=float, default=0.0,
                   help="share of examples left clean under a causal mask, scored as next-token "
                   "prediction (shifted models: keeps an AR-initialised model's skill)")


def train_diffusion(a, model, tok, desc: str, block_ids_at: Optional[Callable] = None) -> list[float]:
    """The masked-diffusion training run of ``model`` on the task's problems, as set by ``a``;
    ``block_ids_at(batch, step)`` gives each step's attention (default: bidirectional)."""
    pairs = tc.task_pairs(tok, a, a.gen_len)

    def step_loss(step: int):
        batch = tc.collate([pairs[i] for i in tc.batch_indices(len(pairs), a.batch, a.seed, step)],
                           tok.pad_token_id).to(a.device)
        loss = diffusion_loss(model, batch, tok.mask_token_id, a.eps, tc.step_generator(a.seed, step),
                              a.weighting, None if block_ids_at is None else block_ids_at(batch, step),
                              a.semi_ar_share, a.block_size, a.ar_share)
        return loss, int(batch.length.sum())

    return tc.run(tc.trainable(model), step_loss, steps=a.steps, lr=a.lr, warmup=a.warmup, out=a.out,
                  save=lambda: tc.save_checkpoint(model, a.out, None), resume=a.resume,
                  save_every=a.save_every, weight_decay=a.weight_decay, desc=desc)


def main(argv=None) -> list[float]:
    a = parse_args(argv)
    tok, model = tc.start_pretraining(a, build_model)
    return train_diffusion(a, model, tok, "teacher")


if __name__ == "__main__":
    main()
