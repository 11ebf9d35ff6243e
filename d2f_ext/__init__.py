"""d2f_ext: Discrete Diffusion Forcing (D2F) decoding for LLaDA and Dream.

Ops live in ``torch.ops.d2f_ext`` (attention, store_kv, unmask, pipeline_step, build_info) and
are wrapped with documented shapes in :mod:`d2f_ext.ops`.
"""

from . import layout, ops, reference
from .ops import build_info

__all__ = ["build_info", "layout", "ops", "reference"]
