"""The per-layer key/value cache the window forward reads and commits to."""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys and values of every layer: ``k[l]`` and ``v[l]`` are contiguous [B, S, Hkv, D].

    One allocation per tensor ([layers, B, S, Hkv, D]); how many positions of each row are valid
    is tracked by the caller (``cache_lens``), not here. Keys are stored after RoPE.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if min(num_layers, batch, capacity, num_kv_heads, head_dim) <= 0:
            raise ValueError(f"KVCache sizes must be positive: layers={num_layers}, batch={batch}, "
                             f"capacity={capacity}, kv_heads={num_kv_heads}, head_dim={head_dim}")
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        # Zeros rather than empty: positions past a row's length are never read, but a kernel
        # bug then shows up as wrong numbers instead of NaN garbage.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int,
                  dtype: Optional[torch.dtype] = None, device=None) -> "KVCache":
        """A cache shaped for ``model`` (its config), in the model's dtype and device by default."""
        p = next(model.parameters())
        c = model.config
        return cls(c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim,
                   dtype=dtype or p.dtype, device=device or p.device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device
