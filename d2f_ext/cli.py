"""d2f-generate: generate text with D2F from a checkpoint folder and print speed statistics."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .auto import AutoD2FModel
from .generate import DECODERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_model() -> str:
    """The model used when --model is not given: a tiny random LLaDA-architecture checkpoint built
    once into the user's cache (it shows the engine working end to end, not sensible text)."""
    from .models.tiny import write_tiny_checkpoint
    folder = os.path.join(os.path.expanduser(os.environ.get("D2F_EXT_CACHE", "~/.cache/d2f_ext")), "tiny-llada")
    if not os.path.exists(os.path.join(folder, "config.json")):
        write_tiny_checkpoint(folder, arch="llada", seed=0)
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2f-generate", description=__doc__)
    p.add_argument("--model", help="checkpoint folder (LLaDA or Dream); default: a built tiny model")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder merged into the model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--file", help="file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--decoder", choices=DECODERS, default="d2f")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--block-add-threshold", type=float, default=0.1)
    p.add_argument("--decoded-token-threshold", type=float, default=0.95)
    p.add_argument("--skip-threshold", type=float, default=0.9)
    p.add_argument("--sampling-strategy", default="default",
                   choices=["default", "margin_confidence", "neg_entropy"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--steps", type=int, help="vanilla decoder: steps per generation (default max-new-tokens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except (ValueError, TypeError, OSError) as e:  # bad arguments or files: a message, not a traceback
        print(f"d2f-generate: error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace) -> int:
    model = AutoD2FModel.from_pretrained(a.model or default_model(), adapter=a.adapter,
                                         dtype=DTYPES[a.dtype], device=a.device)
    tok = model.tokenizer
    if tok is None:
        sys.exit("d2f-generate: the model folder has no tokenizer files; text prompts need one")
    if a.file:
        with open(a.file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = [a.prompt if a.prompt is not None else "Hello"]
    if a.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(block_size=a.block_size, block_add_threshold=a.block_add_threshold,
                  decoded_token_threshold=a.decoded_token_threshold, skip_threshold=a.skip_threshold,
                  sampling_strategy=a.sampling_strategy)
    if a.temperature > 0:
        kwargs.update(do_sample=True, temperature=a.temperature)
    if a.decoder == "vanilla":
        kwargs = dict(block_size=a.block_size, steps=a.steps)
    t0 = time.perf_counter()
    out = model.generate(enc["input_ids"].to(a.device), attention_mask=enc["attention_mask"].to(a.device),
                         max_new_tokens=a.max_new_tokens, decoder=a.decoder,
                         return_dict_in_generate=True, **kwargs)
    seconds = time.perf_counter() - t0
    width = enc["input_ids"].shape[1]
    for row in out.sequences:
        print(tok.decode(row[width:], skip_special_tokens=True))
    new, fwd = int(out.new_tokens.sum()), int(out.forwards.sum())
    print(f"[d2f-generate] decoder={a.decoder} new_tokens={new} forwards={fwd} "
          f"tokens_per_forward={new / max(fwd, 1):.2f} tokens_per_s={new / seconds:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
