"""AutoD2FModel: load a LLaDA or Dream checkpoint folder (optionally a D2F LoRA adapter merged on
top) with d2f_ext's own model code, its tokenizer and generation_config attached and ``generate``
decoding with D2F."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from .generate import patch
from .models import load_adapter, load_model


def load_tokenizer(folder: Union[str, os.PathLike], arch: Optional[str] = None):
    """transformers' AutoTokenizer from the checkpoint folder, or None when it ships none."""
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    custom = _custom_tokenizer(folder)
    if custom is not None:
        # Dream ships DreamTokenizer as code: a copy of Qwen2's byte-level BPE tokenizer over the
        # same vocab.json and merges.txt. AutoTokenizer would ask to run it (a prompt on a
        # terminal, an error elsewhere); this project runs no checkpoint code, so the library's
        # own class for that format reads the files (tokenizer.json alone: the generic fast one).
        from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

        if arch == "dream":
            return Qwen2TokenizerFast.from_pretrained(folder)
        if os.path.exists(os.path.join(folder, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(folder)
        raise ValueError(f"{folder}: the tokenizer is code shipped with the checkpoint ({custom}), which "
                         f"d2f_ext does not run; add a tokenizer.json to the folder")
    # transformers does not know model_type "llada" (this project reads the weights itself), so
    # its config lookup for the tokenizer warns about a type mismatch that does not apply here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)


def _custom_tokenizer(folder) -> Optional[str]:
    """The class tokenizer_config.json maps AutoTokenizer to in code of the checkpoint, if any."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        auto_map = json.load(f).get("auto_map") or {}
    classes = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if isinstance(classes, (list, tuple)):
        classes = next((c for c in classes if c), None)
    return classes or None


def load_generation_config(folder: Union[str, os.PathLike]):
    """The folder's generation_config.json as a transformers GenerationConfig (D2F fields such as
    block_size kept as attributes), or None when it has none."""
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(folder)


class AutoD2FModel:
    @staticmethod
    def from_pretrained(path: Union[str, os.PathLike], adapter: Optional[Union[str, os.PathLike]] = None,
                        dtype: Union[torch.dtype, str] = torch.float32, device: Union[str, torch.device] = "cpu"):
        model = load_model(path, dtype=dtype, device=device)
        if adapter is not None:
            load_adapter(model, adapter)
        model.tokenizer = load_tokenizer(path, model.config.arch)
        model.generation_config = load_generation_config(path)
        return patch(model)
