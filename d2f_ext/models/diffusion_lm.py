"""The forwards shared by LLaDA and Dream; the subclasses only lay out the modules."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .layers import TransformerLayer, normalize, project, rope_cos_sin


def block_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L]: token i sees j iff 0 <= block_ids[j] <= block_ids[i]."""
    bid = block_ids.long()
    visible = (bid[:, None, :] >= 0) & (bid[:, None, :] <= bid[:, :, None])
    # A padding query sees nothing, which makes SDPA return NaN; let it see everything instead
    # (its output is ignored) so that NaN cannot leak into gradients or checks.
    visible |= ~visible.any(-1, keepdim=True)
    return visible[:, None]


class DiffusionLM(nn.Module):
    """A masked-diffusion LM: subclasses provide the embedding, the layers, the final norm and
    the output projection under the checkpoint's parameter names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def transformer_layers(self) -> list[TransformerLayer]:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding()

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        """The output head, None when it is the input embedding (tied); PEFT asks for it, as
        transformers' models answer, when an adapter targets the head."""
        raise NotImplementedError

    def output_logits(self, h: torch.Tensor, impl: Optional[ModuleType] = None) -> torch.Tensor:
        if impl is None:
            from .. import ops as impl
        head = self.get_output_embeddings()
        if head is None:
            return impl.linear(h, self.embedding().weight)
        return project(head, h, impl)

    def forward(self, input_ids: torch.Tensor, block_ids: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-sequence logits [B, L, V] (raw: before Dream's shift), differentiable.

        block_ids [B, L]: block-causal attention (see :func:`block_mask`; -1 = padding, never
        attended, its logits meaningless); None = fully bidirectional. positions [B, L]: RoPE
        positions, default 0..L-1.
        """
        B, L = input_ids.shape
        if positions is None:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = None if block_ids is None else block_mask(block_ids.to(input_ids.device))
        gqa = self.config.num_heads != self.config.num_kv_heads
        x = self.embedding()(input_ids)
        for layer in self.transformer_layers():
            q, k, v = layer.qkv(x, cos, sin)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            x = layer.finish(x, o.transpose(1, 2))
        return self.head(x)

    @torch.no_grad()
    def forward_window(self, input_ids: torch.Tensor, positions: torch.Tensor, block_ids: torch.Tensor,
                       cache: KVCache, cache_lens: torch.Tensor, commit_len: torch.Tensor,
                       cache_rows: Optional[torch.Tensor] = None,
                       impl: Optional[ModuleType] = None) -> torch.Tensor:
        """Logits [B, W, V] of a window over the KV cache (raw: before Dream's shift); see
        :meth:`window_hidden`, whose every position this runs the output head on."""
        return self.head(self.window_hidden(input_ids, positions, block_ids, cache, cache_lens, commit_len,
                                            cache_rows, impl), impl)

    def head(self, hidden: torch.Tensor, impl: Optional[ModuleType] = None) -> torch.Tensor:
        """Logits of final hidden states (any leading shape): the final norm and the output head
        (``impl.rms_norm`` and ``impl.linear`` on plain modules, see :meth:`window_hidden`)."""
        if impl is None:
            from .. import ops as impl
        return self.output_logits(normalize(self.final_norm(), hidden, impl), impl)

    @torch.no_grad()
    def window_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, block_ids: torch.Tensor,
                      cache: KVCache, cache_lens: torch.Tensor, commit_len: torch.Tensor,
                      cache_rows: Optional[torch.Tensor] = None,
                      impl: Optional[ModuleType] = None, packed: Optional[torch.Tensor] = None,
                      outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states [B, W, hidden] of a window over the KV cache, before the output
        head (:meth:`head`), so a decoding loop can run the head on the positions it reads only.

        input_ids, positions: int64 [B, W]; block_ids: int32 [B, W] (-1 = padding). Each window
        token sees every cached position of its row plus the window tokens of its own or an
        earlier block. Window rows [0, commit_len[b]) are written to the cache at cache_lens[b]
        in every layer; cache_lens itself is left for the caller to advance. cache_rows: the
        cache row of each batch row (default b). impl: the module whose ``attention``,
        ``store_kv`` and ``linear`` (every plain linear layer's) run (default :mod:`d2f_ext.ops`;
        :mod:`d2f_ext.reference` for plain PyTorch), and whose ``rms_norm`` and ``rope`` run the
        plain norms and RoPE.
        Inference only: runs without autograd.

        packed: int64 [N], the flat indices (b * W + i) of the window positions that are not
        padding (block_ids >= 0). When given, everything but attention runs on those N
        positions only, as one sequence, so rows of unequal windows batched together cost no
        more than their own positions; the padding's hidden states come back as zeros. Its
        size is data-dependent, so not for a step captured in a CUDA graph.

        outputs: int64 [B, R], the window positions whose final hidden states are wanted; the
        result is then [B, R, hidden] (a padding position's state is then not zeros but
        meaningless). The last layer still computes every position's K and V
        (for the cache and for attention), but its output projection and MLP, most of a
        layer's work, run on those R positions only.
        """
        if impl is None:
            from .. import ops as impl
        B, W = input_ids.shape
        if packed is not None:
            input_ids, positions = input_ids.reshape(1, -1)[:, packed], positions.reshape(1, -1)[:, packed]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        src_start = torch.zeros_like(commit_len)
        x = self.embedding()(input_ids)
        layers = self.transformer_layers()
        for layer_idx, layer in enumerate(layers):
            q, k, v = layer.qkv(x, cos, sin, impl)
            if packed is not None:
                q, k, v = (_unpack(t, packed, B, W) for t in (q, k, v))
            k_cache, v_cache = cache.k[layer_idx], cache.v[layer_idx]
            o = impl.attention(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows,
                               scale=self.scale)
            impl.store_kv(k_cache, v_cache, k, v, cache_lens, src_start, commit_len, cache_rows)
            if outputs is not None and layer_idx == len(layers) - 1:
                flat = (outputs + W * torch.arange(B, device=outputs.device)[:, None]).view(-1)
                x = x.reshape(-1, x.shape[-1])[flat if packed is None else _packed_index(flat, packed, B * W)]
                o = o.reshape(B * W, *o.shape[2:])[flat]
                return layer.finish(x.view(*outputs.shape, -1), o.view(*outputs.shape, *o.shape[1:]), impl)
            if packed is not None:
                o = o.reshape(1, B * W, *o.shape[2:])[:, packed]
            x = layer.finish(x, o, impl)
        return x if packed is None else _unpack(x, packed, B, W)


def _packed_index(flat: torch.Tensor, packed: torch.Tensor, size: int) -> torch.Tensor:
    """The packed indices of flat window indices; a padding position maps to 0, a real
    position whose state the caller ignores."""
    where = torch.zeros(size, dtype=torch.long, device=flat.device)
    where[packed] = torch.arange(packed.numel(), device=flat.device)
    return where[flat]


def _unpack(t: torch.Tensor, packed: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """[1, N, ...] values of the ``packed`` window positions, laid out as [batch, width, ...]
    with zeros at the padding."""
    out = t.new_zeros(batch * width, *t.shape[2:])
    return out.index_copy_(0, packed, t[0]).view(batch, width, *t.shape[2:])
