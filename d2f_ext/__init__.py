"""d2f_ext: Discrete Diffusion Forcing (D2F) decoding for LLaDA and Dream.

Ops live in ``torch.ops.d2f_ext`` (attention, store_kv, unmask, pipeline_step, build_info) and
are wrapped with documented shapes in :mod:`d2f_ext.ops`; :mod:`d2f_ext.reference` holds their
plain-PyTorch twins. Models load with :class:`AutoD2FModel`; ``model.generate`` decodes with D2F.
"""

from . import layout, ops, reference
from .auto import AutoD2FModel
from .config import D2FConfig
from .generate import generate, patch
from .ops import build_info

__all__ = ["AutoD2FModel", "D2FConfig", "build_info", "generate", "layout", "ops", "patch", "reference"]
