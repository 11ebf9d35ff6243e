"""The D2F block-state machine of a batch (the spec's steps 1-4 and 7), as the decoder drives it.

The state is two int32 tensors (layout: :mod:`d2f_ext.layout`): ``rows`` [B, NUM_ROW_FIELDS] and
``blocks`` [B, NUM_BLOCK_FIELDS, NB]. :func:`init_rows` gives rows their initial state (the
prompt as block 0, to be cached) and plans their first forward (prompt + block 1);
:func:`d2f_ext.ops.pipeline_step` advances them after every forward, on their device, with no host
sync. :class:`BlockPipeline` holds the state of one fixed batch.
"""

from __future__ import annotations

import torch

from . import layout as L
from . import ops


def check_settings(block_size: int, block_add_threshold: float, decoded_token_threshold: float) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, v in (("block_add_threshold", block_add_threshold), ("decoded_token_threshold", decoded_token_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")


def init_rows(rows: torch.Tensor, blocks: torch.Tensor, prompt_lens: torch.Tensor, gen_lens: torch.Tensor,
              block_size: int, block_add_threshold: float, decoded_token_threshold: float) -> None:
    """Reset ``rows`` / ``blocks`` (whole tensors, or the rows of a batch gathered and scattered
    back by the caller) to prompts of ``prompt_lens`` tokens with ``gen_lens`` tokens to generate
    each (int32 [B]), then plan their first forward: prompt + block 1."""
    check_settings(block_size, block_add_threshold, decoded_token_threshold)
    if prompt_lens.numel() and int(prompt_lens.min()) < 1:
        raise ValueError("prompt_lens must all be >= 1")
    if gen_lens.numel() and int(gen_lens.min()) < 1:
        raise ValueError("max_new_tokens must be >= 1")
    NB = blocks.shape[2]
    need = 1 + (int(gen_lens.max()) + block_size - 1) // block_size if gen_lens.numel() else 1
    if need > NB:
        raise ValueError(f"blocks holds {NB - 1} generation blocks; max_new_tokens {int(gen_lens.max())} "
                         f"at block_size {block_size} needs {need - 1}")
    rows.zero_()
    rows[:, L.NUM_BLOCKS] = 1
    rows[:, L.EOS_BLOCK] = -1
    rows[:, L.PROMPT_LEN] = prompt_lens
    rows[:, L.GEN_LEN] = gen_lens
    blocks.zero_()
    blocks[:, L.LEN, 0] = prompt_lens
    blocks[:, L.STATE, 0] = L.TO_CACHE
    blocks[:, L.FULLY_ACTIVATED, 0] = 1
    B = rows.shape[0]
    ops.pipeline_step(rows, blocks, torch.zeros(B, NB, dtype=torch.int32, device=rows.device),
                      torch.full((B,), -1, dtype=torch.int32, device=rows.device),
                      block_size, block_add_threshold, decoded_token_threshold)


def num_blocks_for(max_new_tokens: int, block_size: int) -> int:
    """NB for rows generating at most ``max_new_tokens``: the prompt + ceil(max_new / block_size)."""
    return 1 + -(-max_new_tokens // block_size)


class BlockPipeline:
    """The state of one fixed batch, all rows with the same settings; ``step()`` applies a
    forward's unmask result (counts, eos_block from :func:`d2f_ext.ops.unmask`) and plans the next."""

    def __init__(self, prompt_lens: torch.Tensor, max_new_tokens: int, block_size: int,
                 block_add_threshold: float, decoded_token_threshold: float):
        if prompt_lens.dim() != 1 or prompt_lens.dtype != torch.int32:
            raise ValueError(f"prompt_lens must be int32 [B], got {prompt_lens.dtype} {tuple(prompt_lens.shape)}")
        check_settings(block_size, block_add_threshold, decoded_token_threshold)
        self._params = (block_size, float(block_add_threshold), float(decoded_token_threshold))
        B, dev = prompt_lens.shape[0], prompt_lens.device
        self._rows = torch.empty(B, L.NUM_ROW_FIELDS, dtype=torch.int32, device=dev)
        self._blocks = torch.empty(B, L.NUM_BLOCK_FIELDS, num_blocks_for(max_new_tokens, block_size),
                                   dtype=torch.int32, device=dev)
        init_rows(self._rows, self._blocks, prompt_lens, torch.full_like(prompt_lens, max_new_tokens),
                  *self._params)

    def step(self, counts: torch.Tensor, eos_block: torch.Tensor) -> None:
        """Apply one forward's unmask result and plan the next forward (no host sync)."""
        ops.pipeline_step(self._rows, self._blocks, counts, eos_block, *self._params)

    @property
    def rows(self) -> torch.Tensor:
        """int32 [B, layout.NUM_ROW_FIELDS], updated in place by step()."""
        return self._rows

    @property
    def blocks(self) -> torch.Tensor:
        """int32 [B, layout.NUM_BLOCK_FIELDS, NB], updated in place by step()."""
        return self._blocks

    @property
    def num_blocks_max(self) -> int:
        return self._blocks.shape[2]

    def finished(self) -> bool:
        """Whether every row is done (synchronises with the device)."""
        return bool(self._rows[:, L.FINISHED].all())


def window_block_ids(rows: torch.Tensor, blocks: torch.Tensor, window: int) -> torch.Tensor:
    """int32 [B, window]: the block of each planned window position, -1 past the row's window.

    What attention and unmask take as ``block_ids`` for the window of the planned forward;
    computed on the state's device without a host sync (``window`` >= every row's WIN_LEN).
    """
    NB = blocks.shape[2]
    w = torch.arange(window, device=rows.device)
    pos = rows[:, L.WIN_START, None] + w  # [B, W]
    exists = torch.arange(NB, device=rows.device) < rows[:, L.NUM_BLOCKS, None]  # [B, NB]
    started = (blocks[:, None, L.START, :] <= pos[..., None]) & exists[:, None, :]
    ids = started.sum(-1, dtype=torch.int32) - 1
    return ids.masked_fill(w >= rows[:, L.WIN_LEN, None], -1)
