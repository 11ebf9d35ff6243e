"""Pipelined D2F decoding on the d2f_ext ops, through the model's engine (:mod:`d2f_ext.engine`)."""

from __future__ import annotations

from typing import Optional, Sequence

from ..config import D2FConfig
from ..engine import engine_for
from .common import DecodeOutput


def d2f_decode(model, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *, eos_id: Optional[int] = None,
               on_step=None, static: Optional[bool] = None, sync_every: int = 4,
               cuda_graphs: Optional[bool] = None) -> DecodeOutput:
    """Decode every prompt (lists of real token ids) with D2F; see :class:`D2FConfig`.

    on_step(outputs) gets each step's :class:`d2f_ext.engine.StepOutput` list, for streaming.
    static / sync_every / cuda_graphs: how the engine drives its steps (see
    :class:`d2f_ext.engine.EngineConfig`; cuda_graphs replays greedy static steps on CUDA).
    """
    length = max((len(p) for p in prompts), default=1) + cfg.max_new_tokens
    engine = engine_for(model, cfg.block_size, max(len(prompts), 1), length, static=static,
                        sync_every=sync_every, cuda_graphs=cuda_graphs)
    return engine.decode(prompts, cfg, eos_id=eos_id, on_step=on_step)[0]
