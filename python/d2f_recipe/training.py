"""Data, optimisation loop, checkpoints and resume shared by train_teacher, distill and train_ar."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import time
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from d2f_recipe import task_math, tokenizer_math
from d2f_recipe.tokenizer_math import copy_tokenizer

STATE_DIR = "trainer"  # optimiser state and step, inside the output folder


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor  # [B, L] int64, right-padded
    prompt_len: torch.Tensor  # [B]
    length: torch.Tensor  # [B]: prompt + response; positions at or past it are padding

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.prompt_len.to(device), self.length.to(device))

    def positions(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None]

    def response(self) -> torch.Tensor:
        pos = self.positions()
        return (pos >= self.prompt_len[:, None]) & (pos < self.length[:, None])

    def real(self) -> torch.Tensor:
        return self.positions() < self.length[:, None]


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], eos_id: int,
                 gen_len: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (prompt, response + EOS). With ``gen_len`` the response is filled up to
    ``gen_len`` tokens with EOS, as LLaDA's SFT does: a diffusion model decodes a fixed-length
    canvas, and learning to fill its tail with EOS is what ends the answer."""
    out = []
    for p, r in zip(prompts, responses):
        pi = tokenizer(p, add_special_tokens=False).input_ids
        ri = tokenizer(r, add_special_tokens=False).input_ids + [eos_id]
        if gen_len is not None:
            if len(ri) > gen_len:
                raise ValueError(f"a response of {len(ri)} tokens does not fit gen_len={gen_len}")
            ri += [eos_id] * (gen_len - len(ri))
        out.append((pi, ri))
    return out


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    lengths = [len(p) + len(r) for p, r in pairs]
    ids = torch.full((len(pairs), max(lengths)), pad_id, dtype=torch.long)
    for b, (p, r) in enumerate(pairs):
        ids[b, : lengths[b]] = torch.tensor(p + r)
    return Batch(ids, torch.tensor([len(p) for p, _ in pairs]), torch.tensor(lengths))


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(perm)
    return tuple(perm)


def batch_indices(n: int, batch: int, seed: int, draw: int) -> list[int]:
    """Example indices of the ``draw``-th batch: epochs of seeded shuffles, so that a resumed run
    sees exactly the batches the uninterrupted run would have."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(draw * batch, (draw + 1) * batch)]


def step_generator(seed: int, draw: int) -> torch.Generator:
    """The noise RNG of one batch, a function of (seed, draw) alone for the same reason."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's right shift: the prediction for position p is the output at p - 1 (position 0,
    always prompt, keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _residual_output(name: str) -> bool:
    module = name.split(".")[-2]
    # LLaDA's ff_out is both a layer's down projection and (outside the blocks) the head.
    return module in ("attn_out", "o_proj", "down_proj") or module == "ff_out" and ".blocks." in name


def init_weights(model: torch.nn.Module, num_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init for training from scratch: small normal weights, residual-branch outputs
    scaled down with depth so the residual stream does not grow layer by layer, unit norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or "ln_f" in name else 0.0)
            else:
                p.normal_(0.0, std / math.sqrt(2 * num_layers) if _residual_output(name) else std)



def save_checkpoint(model, folder: str, tokenizer_src: Optional[str]) -> None:
    """A checkpoint folder d2f_ext.models.load_model reads: config.json with the model's own
    keys, model.safetensors under the checkpoint names, and the tokenizer."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_dict(), f, indent=1)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    if tokenizer_src:
        copy_tokenizer(tokenizer_src, folder)


def write_generation_config(folder: str, **settings) -> None:
    """generation_config.json: the decoding settings AutoD2FModel's generate uses by default."""
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_state(out: str, params: dict, opt: torch.optim.Optimizer, step: int) -> None:
    d = os.path.join(out, STATE_DIR)
    os.makedirs(d, exist_ok=True)
    save_file({n: p.detach().to("cpu").contiguous() for n, p in params.items()}, os.path.join(d, "params.safetensors"))
    torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
    with open(os.path.join(d, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step}, f)


def _load_state(out: str, params: dict, opt: torch.optim.Optimizer) -> int:
    d = os.path.join(out, STATE_DIR)
    saved = load_file(os.path.join(d, "params.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"{d} holds parameters for another model or training mode")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    opt.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
    with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
        return int(json.load(f)["step"])


def can_resume(out: str) -> bool:
    return os.path.isfile(os.path.join(out, STATE_DIR, "state.json"))


def run(params: dict[str, torch.nn.Parameter], step_loss: Callable[[int], tuple[torch.Tensor, int]], *,
        steps: int, lr: float, warmup: int, out: str, save: Callable[[], None], resume: bool,
        save_every: int = 500, weight_decay: float = 0.0, clip: float = 1.0, desc: str = "train",
        is_main: bool = True) -> list[float]:
    """AdamW over ``params`` for ``steps`` steps; ``step_loss(step)`` returns (loss, tokens in
    the batch). Saves the trainer state and calls ``save`` every ``save_every`` steps and at the
    end; with ``resume`` continues from the saved state. Returns the losses of the steps run."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    start = _load_state(out, params, opt) if resume and can_resume(out) else 0
    losses: list[float] = []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not is_main,
               dynamic_ncols=True)
    tokens, t0, smooth = 0, time.perf_counter(), None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup, lr)
        loss, n_tok = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        losses.append(value)
        tokens += n_tok
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        bar.set_postfix(loss=f"{smooth:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if is_main and (done % save_every == 0 or done == steps):
            _save_state(out, params, opt, done)
            save()
    return losses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_counts(p: argparse.ArgumentParser, a: argparse.Namespace, **minimum: int) -> None:
    """Exit with argparse's usage error when an integer argument given is below its minimum."""
    for name, low in minimum.items():
        if getattr(a, name) is not None and getattr(a, name) < low:
            p.error(f"{_flag(name)} must be >= {low}, got {getattr(a, name)}")


def check_tokenizer_source(p: argparse.ArgumentParser, a: argparse.Namespace, name: str) -> None:
    """Exit with argparse's usage error when the folder argument ``name``, given, holds no
    tokenizer to copy: before any work rather than when the copy is made."""
    if getattr(a, name):
        try:
            tokenizer_math.check_tokenizer(getattr(a, name))
        except ValueError as e:
            p.error(f"{_flag(name)}: {e}")


# The minimums of add_run_args's counts: a run without warm-up starts at the peak rate.
RUN_COUNTS = {"train_size": 1, "steps": 1, "batch": 1, "warmup": 0, "save_every": 1, "threads": 1}


def add_run_args(p, steps: int, lr: float, warmup: int, save_every: int = 500) -> None:
    """The data and optimisation arguments of every trainer but distill."""
    p.add_argument("--train-size", type=int, default=100000, help="distinct training problems")
    task_math.add_level_arg(p)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--resume", action="store_true", help="continue from the state in --out")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu")


def add_pretraining_args(p, steps: int) -> None:
    """The arguments of the from-scratch trainers (teacher and AR baseline), which must match for
    the two models to be comparable."""
    p.add_argument("--out", required=True, help="checkpoint folder (also holds the resume state)")
    p.add_argument("--tokenizer", help="folder of an existing tokenizer to share (default: train one)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, help="MLP width (default 3 x hidden)")
    p.add_argument("--max-len", type=int, default=512)
    add_run_args(p, steps, lr=1e-3, warmup=200)


def check_pretraining_args(p, a, **minimum: int) -> None:
    """Exit with argparse's usage error on a bad argument of add_pretraining_args, or on one of
    the trainer's own integer arguments below its ``minimum``."""
    check_counts(p, a, **RUN_COUNTS, hidden=1, layers=1, heads=1, intermediate=1, max_len=1, **minimum)
    check_tokenizer_source(p, a, "tokenizer")


def start_pretraining(a, build_model):
    """Threads, seed, output folder, tokenizer, the model (in train mode) and the training
    problems, as the from-scratch trainers set them up: returns (tokenizer, model)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    tok = tokenizer_math.load_or_build(a.out, a.tokenizer, a.seed, level=a.level)
    model = build_model(tok, a.hidden, a.layers, a.heads, a.intermediate or 3 * a.hidden, a.max_len)
    model.to(a.device).train()
    return tok, model


def task_examples(a) -> tuple[list[str], list[str]]:
    """(prompts, responses) of the task's ``a.train_size`` training problems."""
    problems = task_math.problems("train", a.train_size, a.seed, a.level)
    return [task_math.format_prompt(q.question) for q in problems], [q.solution for q in problems]


def task_pairs(tok, a, gen_len: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """The encoded (prompt, response) pairs of :func:`task_examples`."""
    return encode_pairs(tok, *task_examples(a), tok.eos_token_id, gen_len)

