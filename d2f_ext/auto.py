"""AutoD2FModel: load a LLaDA or Dream checkpoint folder (optionally a D2F LoRA adapter merged on
top) with d2f_ext's own model code, its tokenizer and generation_config attached and ``generate``
decoding with D2F."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .generate import patch
from .models import load_adapter, load_model


def load_tokenizer(folder: Union[str, os.PathLike]):
    """transformers' AutoTokenizer from the checkpoint folder, or None when it ships none."""
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers does not know model_type "llada" (this project reads the weights itself), so
    # its config lookup for the tokenizer warns about a type mismatch that does not apply here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)


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
        model.tokenizer = load_tokenizer(path)
        model.generation_config = load_generation_config(path)
        return patch(model)
