"""Dream (Qwen2 layout) under the checkpoint's parameter names (model.{embed_tokens, layers.N.*,
norm}, lm_head). Its logits are shifted right by one; that shift is the caller's business."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .config import ModelConfig
from .diffusion_lm import DiffusionLM
from .layers import TransformerLayer, RMSNorm


class DreamLayer(TransformerLayer):
    PARTS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, config.num_heads * hd, bias=True)
        self.self_attn.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=True)
        self.self_attn.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=True)
        self.self_attn.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, f, bias=False)
        self.mlp.up_proj = nn.Linear(d, f, bias=False)
        self.mlp.down_proj = nn.Linear(f, d, bias=False)


class DreamModel(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DreamLayer(config) for _ in range(config.num_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def transformer_layers(self):
        return self.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return getattr(self, "lm_head", None)
