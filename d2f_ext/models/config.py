"""One configuration for both architectures, parsed from a checkpoint's config.json.

LLaDA (model_type "llada") and Dream (model_type "Dream", Qwen2-style) name the same quantities
differently; :class:`ModelConfig` holds them under one set of names so that the model code and the
engine never look at the raw keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

LLADA_MASK_TOKEN_ID = 126336  # the published LLaDA mask id; its config.json does not always carry it


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llada" or "dream"
    vocab_size: int  # rows of the embedding and columns of the logits
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    linear_bias: bool  # bias on every other linear layer (LLaDA include_bias)
    mask_token_id: int
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    max_position_embeddings: int
    logit_shift: bool  # Dream: position p's prediction is the logits output at p - 1
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        """The checkpoint's own config.json keys (what PEFT and HF tooling look for)."""
        return dict(self.raw)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type == "llada":
            return _llada(d)
        if isinstance(model_type, str) and model_type.lower() == "dream":
            return _dream(d)
        raise ValueError(f"unsupported model_type {model_type!r}: expected 'llada' or 'Dream'")

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """Parse a config.json file, or the config.json inside a folder."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _need(d: dict, key: str, arch: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"{arch} config.json lacks {key!r}")
    return d[key]


def _first_id(value) -> Optional[int]:
    # eos_token_id may be a list in HF configs; the first entry is the canonical one.
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _reject(d: dict, arch: str, unsupported: dict) -> None:
    """Refuse options whose math this implementation does not have, rather than ignore them."""
    for key, ok in unsupported.items():
        if key in d and not ok(d[key]):
            raise ValueError(f"{arch} config option {key}={d[key]!r} is not supported")


def _check_shapes(cfg: ModelConfig) -> ModelConfig:
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{cfg.arch}: hidden size {cfg.hidden_size}, {cfg.num_heads} heads and "
                         f"{cfg.num_kv_heads} KV heads do not divide evenly")
    if cfg.head_dim % 2:
        raise ValueError(f"{cfg.arch}: head_dim {cfg.head_dim} must be even for RoPE")
    if not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise ValueError(f"{cfg.arch}: mask_token_id {cfg.mask_token_id} outside the vocabulary "
                         f"of {cfg.vocab_size}")
    return cfg


def _llada(d: dict) -> ModelConfig:
    _reject(d, "llada", {
        "alibi": lambda v: not v, "rope": bool, "layer_norm_type": lambda v: v == "rms",
        "block_type": lambda v: v == "llama", "activation_type": lambda v: v in ("silu", "swiglu"),
        "attention_layer_norm": lambda v: not v, "input_emb_norm": lambda v: not v,
        "scale_logits": lambda v: not v, "layer_norm_with_affine": bool,
        "bias_for_layer_norm": lambda v: not v, "multi_query_attention": lambda v: not v,
        "block_group_size": lambda v: v == 1, "clip_qkv": lambda v: v is None,
    })
    heads = int(_need(d, "n_heads", "llada"))
    mask = d.get("mask_token_id")
    cfg = ModelConfig(
        arch="llada",
        vocab_size=int(d.get("embedding_size") or _need(d, "vocab_size", "llada")),
        hidden_size=int(_need(d, "d_model", "llada")),
        num_heads=heads,
        num_kv_heads=int(d.get("n_kv_heads") or heads),
        num_layers=int(_need(d, "n_layers", "llada")),
        intermediate_size=int(_need(d, "mlp_hidden_size", "llada")),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(d.get("weight_tying", False)),
        qkv_bias=bool(d.get("include_bias", False) or d.get("include_qkv_bias", False)),
        linear_bias=bool(d.get("include_bias", False)),
        mask_token_id=LLADA_MASK_TOKEN_ID if mask is None else int(mask),
        eos_token_id=_first_id(d.get("eos_token_id")),
        pad_token_id=_first_id(d.get("pad_token_id")),
        max_position_embeddings=int(d.get("max_sequence_length", 4096)),
        logit_shift=False,
        raw=dict(d),
    )
    return _check_shapes(cfg)


def _dream(d: dict) -> ModelConfig:
    _reject(d, "dream", {
        "hidden_act": lambda v: v == "silu", "use_sliding_window": lambda v: not v,
        "rope_scaling": lambda v: v is None,
    })
    heads = int(_need(d, "num_attention_heads", "dream"))
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads != int(_need(d, "hidden_size", "dream")):
        raise ValueError(f"dream config option head_dim={head_dim!r} is not supported: it must be "
                         f"hidden_size / num_attention_heads")
    cfg = ModelConfig(
        arch="dream",
        vocab_size=int(_need(d, "vocab_size", "dream")),
        hidden_size=int(_need(d, "hidden_size", "dream")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        num_layers=int(_need(d, "num_hidden_layers", "dream")),
        intermediate_size=int(_need(d, "intermediate_size", "dream")),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True,
        linear_bias=False,
        mask_token_id=int(_need(d, "mask_token_id", "dream")),
        eos_token_id=_first_id(d.get("eos_token_id")),
        pad_token_id=_first_id(d.get("pad_token_id")),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        logit_shift=True,
        raw=dict(d),
    )
    return _check_shapes(cfg)
