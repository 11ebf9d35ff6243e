"""LLaDA under the checkpoint's parameter names (model.transformer.{wte, blocks.N.*, ln_f, ff_out})."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .config import ModelConfig
from .diffusion_lm import DiffusionLM
from .layers import TransformerLayer, RMSNorm


class LLaDABlock(TransformerLayer):
    # ff_proj is the gate (activated), up_proj the linear branch, ff_out the down projection.
    PARTS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out",
             "ff_norm", "ff_proj", "up_proj", "ff_out")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
        bias = config.linear_bias
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.attn_out = nn.Linear(config.num_heads * hd, d, bias=bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.ff_out = nn.Linear(f, d, bias=bias)


class LLaDAModel(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        t = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.hidden_size),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.num_layers)),
            "ln_f": RMSNorm(config.hidden_size, config.rms_norm_eps),
        })
        if not config.tie_word_embeddings:
            t["ff_out"] = nn.Linear(config.hidden_size, config.vocab_size, bias=config.linear_bias)
        self.model = nn.Module()
        self.model.transformer = t

    def embedding(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def transformer_layers(self):
        return self.model.transformer["blocks"]

    def final_norm(self) -> nn.Module:
        return self.model.transformer["ln_f"]

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return self.model.transformer["ff_out"] if "ff_out" in self.model.transformer else None
