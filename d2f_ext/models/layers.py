"""Building blocks shared by LLaDA and Dream: RMSNorm, rotary embeddings, the transformer layer."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, fp32 [B, L, 1, head_dim], for explicit per-token positions [B, L]."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def _as_is(module: nn.Module, cls: type) -> bool:
    """Whether module computes exactly what cls does: not a subclass (as PEFT's layers are), no
    hooks (e.g. accelerate's offload), no forward patched onto it."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__)


def project(module: nn.Module, x: torch.Tensor, impl: Optional[ModuleType]) -> torch.Tensor:
    """``module(x)`` for a linear module; a plain ``nn.Linear`` runs as ``impl.linear`` (d2f_ext's
    few-row kernel, see :func:`d2f_ext.ops.linear`) when impl is given. A PEFT layer or hooks
    (e.g. accelerate's offload) keep the module's own forward."""
    if impl is not None and _as_is(module, nn.Linear):
        return impl.linear(x, module.weight, module.bias)
    return module(x)


def normalize(norm: nn.Module, x: torch.Tensor, impl: Optional[ModuleType]) -> torch.Tensor:
    """``norm(x)``; a plain :class:`RMSNorm` runs as ``impl.rms_norm`` when impl is given (as
    :func:`project` runs a linear layer)."""
    if impl is not None and _as_is(norm, RMSNorm):
        return impl.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module,
           impl: Optional[ModuleType] = None) -> torch.Tensor:
    return project(down, F.silu(project(gate, x, impl)) * project(up, x, impl), impl)


class TransformerLayer(nn.Module):
    """A pre-norm attention + SwiGLU layer. Subclasses create the modules under their checkpoint's
    names and list their dotted paths in PARTS, in the order: attention norm, q, k, v, output
    projection, MLP norm, gate, up, down. Attention itself is left to the caller (full-sequence
    SDPA or the cached window kernels), between :meth:`qkv` and :meth:`finish`."""

    PARTS: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim

    def _parts(self) -> list[nn.Module]:
        # Looked up on every call, never cached: PEFT swaps the linear layers for LoRA wrappers.
        # Walked through _modules because get_submodule's checks cost about 0.3 ms a forward of
        # the shipped 4-layer model, several percent of a decoding step on the CPU.
        parts = []
        for path in self.PARTS:
            module = self
            for name in path.split("."):
                module = module._modules[name]
            parts.append(module)
        return parts

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: Optional[ModuleType] = None):
        """q [B, L, H, D], k and v [B, L, Hkv, D], RoPE applied to q and k. impl: the module
        whose ``linear``, ``rms_norm`` and ``rope`` run (see :func:`project`); None runs the
        modules as they are and RoPE as :mod:`d2f_ext.reference` does."""
        norm, q_proj, k_proj, v_proj = self._parts()[:4]
        B, L, _ = x.shape
        h = normalize(norm, x, impl)
        q = project(q_proj, h, impl).view(B, L, self.num_heads, self.head_dim)
        k = project(k_proj, h, impl).view(B, L, self.num_kv_heads, self.head_dim)
        v = project(v_proj, h, impl).view(B, L, self.num_kv_heads, self.head_dim)
        rope = (impl or reference).rope
        return rope(q, cos, sin), rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, impl: Optional[ModuleType] = None) -> torch.Tensor:
        """The residual stream after this layer, given the attention output [B, L, H, D]; impl
        as in :meth:`qkv`."""
        o_proj, norm, gate, up, down = self._parts()[4:]
        x = x + project(o_proj, attn_out.reshape(*x.shape[:2], -1), impl)
        return x + swiglu(normalize(norm, x, impl), gate, up, down, impl)
