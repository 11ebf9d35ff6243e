"""LLaDA and Dream in plain PyTorch, with the checkpoints' own parameter names.

Every model has a differentiable full-sequence ``forward`` and a KV-cached ``forward_window``
that runs attention through the d2f_ext ops.
"""

from .cache import KVCache
from .config import ModelConfig
from .diffusion_lm import DiffusionLM
from .dream import DreamModel
from .llada import LLaDAModel
from .loading import CheckpointError, check_adapter, load_adapter, load_model, model_for_config

__all__ = ["CheckpointError", "DiffusionLM", "DreamModel", "KVCache", "LLaDAModel", "ModelConfig",
           "check_adapter", "load_adapter", "load_model", "model_for_config"]
