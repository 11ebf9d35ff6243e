"""D2FConfig: the decoding parameters, with the D2F authors' names, validated once."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from . import layout as L


@dataclasses.dataclass(frozen=True)
class D2FConfig:
    """Parameters of pipelined D2F decoding (names as in the paper's code).

    block_size: tokens per generation block. block_add_threshold: decoded fraction of the
    newest block at which the next block is appended (1.0 = one block at a time, Fast-dLLM
    style). decoded_token_threshold: decoded fraction of block i at which block i+1 becomes
    fully activated. skip_threshold: a masked position is decoded when its probability is
    strictly above it. sampling_strategy: confidence of the forced single pick ("default",
    "margin_confidence", "neg_entropy"). max_new_tokens: at most max_new_tokens // block_size
    blocks, as in the D2F authors' loop, or one shorter block when it is below block_size (see
    :attr:`gen_len`). temperature 0 is greedy; top_k / top_p filter before the softmax.
    """

    block_size: int = 32
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    skip_threshold: float = 0.9
    sampling_strategy: str = "default"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        for name in ("block_add_threshold", "decoded_token_threshold", "skip_threshold"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.sampling_strategy not in L.CONFIDENCES:
            raise ValueError(f"sampling_strategy must be one of {sorted(L.CONFIDENCES)}, "
                             f"got {self.sampling_strategy!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {self.top_k!r}")
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # No None: from_generation_config resolves an unset seed, and the decoders add the step
        # count to it.
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def gen_len(self) -> int:
        """Tokens the D2F loop generates at most: whole blocks, or one block of max_new_tokens
        when that is below block_size."""
        if self.max_new_tokens < self.block_size:
            return self.max_new_tokens
        return self.max_new_tokens // self.block_size * self.block_size

    @classmethod
    def from_generation_config(cls, generation_config: Any = None, **overrides) -> "D2FConfig":
        """The settings a transformers ``GenerationConfig`` (or a dict, e.g. generation_config.json)
        gives, then ``overrides`` (None means not given), then the defaults. As in transformers,
        decoding is greedy unless ``do_sample``, which ignores temperature / top_k / top_p when
        off; sampling defaults to temperature 1 and, unseeded, draws its seed from torch's
        generator (so torch.manual_seed reproduces it)."""
        s = {}
        if generation_config is not None:
            gc = generation_config.to_dict() if hasattr(generation_config, "to_dict") else dict(generation_config)
            s.update({k: v for k, v in gc.items() if v is not None})
        s.update({k: v for k, v in overrides.items() if v is not None})
        if not s.pop("do_sample", False):
            for k in ("temperature", "top_k", "top_p"):
                s.pop(k, None)
        else:
            s.setdefault("temperature", 1.0)
            s.setdefault("seed", int(torch.randint(0, 2 ** 62, (1,))))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in s.items() if k in fields})

    @classmethod
    def fast_dllm(cls, **kwargs) -> "D2FConfig":
        """One block at a time with threshold decoding: D2F with block_add_threshold = 1."""
        return cls(**{**kwargs, "block_add_threshold": 1.0})


def is_int(x) -> bool:
    """An int and not a bool, for counts and ids."""
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not a count


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
