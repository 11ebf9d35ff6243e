"""Decoders: D2F on the ops through the engine (d2f), the same algorithm in plain PyTorch
(reference_loop), and vanilla LLaDA/Dream decoding (vanilla). Fast-dLLM mode is D2F with
block_add_threshold = 1. :func:`decode` is the one table of them."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..config import D2FConfig
from .common import DecodeOutput
from .d2f import d2f_decode
from .reference_loop import reference_decode
from .vanilla import vanilla_decode

DECODERS = ("d2f", "fast-dllm", "vanilla", "reference")


def check_steps(decoder: str, steps: Optional[int]) -> None:
    """A ValueError when ``steps`` is given to a decoder that would not read it."""
    if steps is not None and decoder != "vanilla":
        raise ValueError(f"steps is vanilla decoding's setting; decoder={decoder!r} decodes by thresholds")


def decode(model, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *, decoder: str = "d2f",
           eos_id: Optional[int] = None, steps: Optional[int] = None) -> DecodeOutput:
    """Decode with one of :data:`DECODERS`. vanilla takes cfg's block_size and max_new_tokens and
    ``steps`` per generation (default: one token a step); the others take all of cfg."""
    check_steps(decoder, steps)
    if decoder == "d2f":
        return d2f_decode(model, prompts, cfg, eos_id=eos_id)
    if decoder == "fast-dllm":
        return d2f_decode(model, prompts, D2FConfig.fast_dllm(**dataclasses.asdict(cfg)), eos_id=eos_id)
    if decoder == "reference":
        return reference_decode(model, prompts, cfg, eos_id=eos_id)
    if decoder == "vanilla":
        return vanilla_decode(model, prompts, max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size,
                              steps=cfg.max_new_tokens if steps is None else steps)
    raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


__all__ = ["DECODERS", "DecodeOutput", "check_steps", "d2f_decode", "decode", "reference_decode", "vanilla_decode"]
