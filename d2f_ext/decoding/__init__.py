"""Decoders: D2F on the ops (d2f), the same algorithm in plain PyTorch (reference_loop), and
vanilla LLaDA/Dream decoding (vanilla). Fast-dLLM mode is D2F with block_add_threshold = 1."""

from .common import DecodeOutput
from .d2f import d2f_decode
from .reference_loop import reference_decode
from .vanilla import vanilla_decode

__all__ = ["DecodeOutput", "d2f_decode", "reference_decode", "vanilla_decode"]
