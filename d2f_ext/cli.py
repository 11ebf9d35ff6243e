"""d2f-generate: generate text with D2F from a checkpoint folder and print speed statistics."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .auto import AutoD2FModel
from .generate import DECODERS, THRESHOLD_SETTINGS
from .models.loading import DTYPES, check_device

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "d2f-math")
DEFAULT_PROMPT = ("Mia has 12 apples. Mia buys 7 more apples and then gives 5 of them. "
                  "How many apples does Mia have now?")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2f-generate", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder (LLaDA or Dream); default: the shipped D2F student of the "
                        "small-model recipe, which answers grade-school math questions")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder merged into the model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: a math question)")
    src.add_argument("--file", help="file with one prompt per line")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--decoder", choices=DECODERS, default="d2f")
    # Decoding settings left unset come from the checkpoint's generation_config.json, then from
    # D2FConfig's defaults.
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--block-add-threshold", type=float)
    p.add_argument("--decoded-token-threshold", type=float)
    p.add_argument("--skip-threshold", type=float)
    p.add_argument("--sampling-strategy", choices=["default", "margin_confidence", "neg_entropy"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--steps", type=int, help="vanilla decoder: steps per generation (default max-new-tokens)")
    p.add_argument("--stop", action="append", help="stop string (repeatable): a completion ends once its text holds one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="float16 for GPUs without bfloat16")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0: greedy), got {a.temperature}")
    if a.decoder == "vanilla":
        given = [f"--{n.replace('_', '-')}" for n in THRESHOLD_SETTINGS if getattr(a, n) is not None]
        given += ["--temperature"] if a.temperature > 0 else []
        if given:
            p.error(f"--decoder vanilla (greedy, --steps per generation) takes no {', '.join(given)}")
    elif a.steps is not None:
        p.error(f"--steps is the vanilla decoder's setting; --decoder {a.decoder} decodes by thresholds")
    return a


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except (ValueError, TypeError, OSError) as e:  # bad arguments or files: a message, not a traceback
        print(f"d2f-generate: error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace) -> int:
    check_device(a.device)
    model = AutoD2FModel.from_pretrained(a.model, adapter=a.adapter, dtype=DTYPES[a.dtype], device=a.device)
    tok = model.tokenizer
    if tok is None:
        sys.exit("d2f-generate: the model folder has no tokenizer files; text prompts need one")
    if a.file:
        with open(a.file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--file {a.file}: no prompt in it (every line is blank)")
    else:
        prompts = [a.prompt if a.prompt is not None else DEFAULT_PROMPT]
    if a.chat or (a.chat is None and tok.chat_template):
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = {n: getattr(a, n) for n in ("block_size", *THRESHOLD_SETTINGS) if getattr(a, n) is not None}
    if a.steps is not None:
        kwargs["steps"] = a.steps
    if a.temperature > 0:
        kwargs.update(do_sample=True, temperature=a.temperature)
    if a.stop:
        kwargs["stop_strings"] = a.stop
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
