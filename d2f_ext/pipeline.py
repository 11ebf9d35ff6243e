"""The D2F block-state machine of a batch (../D2F-SPEC.md), as the decoder drives it.

``BlockPipeline`` owns the ``rows`` / ``blocks`` state tensors (layout: :mod:`d2f_ext.layout`) on
the prompts' device and advances them with :func:`d2f_ext.ops.pipeline_step`, through the C++
class ``torch.classes.d2f_ext.BlockPipeline`` when the extension is loaded. Right after
construction the first forward (prompt + block 1) is planned; after each forward, pass
``step()`` the counts and EOS block returned by :func:`d2f_ext.ops.unmask`.
"""

from __future__ import annotations

import torch

from . import layout as L
from . import ops, reference


class BlockPipeline:
    def __init__(self, prompt_lens: torch.Tensor, max_new_tokens: int, block_size: int,
                 block_add_threshold: float, decoded_token_threshold: float):
        args = (int(max_new_tokens), int(block_size), float(block_add_threshold),
                float(decoded_token_threshold))
        if ops.HAVE_C:
            self._impl = torch.classes.d2f_ext.BlockPipeline(prompt_lens, *args)
            self._rows, self._blocks = self._impl.rows(), self._impl.blocks()
            return
        self._impl = None
        self._init_reference(prompt_lens, *args)

    def _init_reference(self, prompt_lens, max_new_tokens, block_size, add, act):
        if prompt_lens.dim() != 1 or prompt_lens.dtype != torch.int32:
            raise RuntimeError("BlockPipeline: prompt_lens must be int32 [B]")
        if block_size <= 0:
            raise RuntimeError(f"BlockPipeline: block_size must be > 0, got {block_size}")
        if max_new_tokens < block_size:
            raise RuntimeError(f"BlockPipeline: max_new_tokens must be >= block_size = {block_size}")
        for name, v in (("block_add_threshold", add), ("decoded_token_threshold", act)):
            if not 0.0 <= v <= 1.0:
                raise RuntimeError(f"BlockPipeline: {name} must be in [0, 1], got {v}")
        if prompt_lens.numel() and int(prompt_lens.min()) < 1:
            raise RuntimeError("BlockPipeline: prompt_lens must all be >= 1")
        B, NB = prompt_lens.shape[0], 1 + max_new_tokens // block_size
        self._params = (block_size, add, act)
        self._rows = torch.zeros(B, L.NUM_ROW_FIELDS, dtype=torch.int32, device=prompt_lens.device)
        self._rows[:, L.NUM_BLOCKS] = 1
        self._rows[:, L.EOS_BLOCK] = -1
        self._rows[:, L.PROMPT_LEN] = prompt_lens
        self._blocks = torch.zeros(B, L.NUM_BLOCK_FIELDS, NB, dtype=torch.int32, device=prompt_lens.device)
        self._blocks[:, L.LEN, 0] = prompt_lens
        self._blocks[:, L.STATE, 0] = L.TO_CACHE
        self._blocks[:, L.FULL, 0] = 1
        self.step(torch.zeros(B, NB, dtype=torch.int32, device=prompt_lens.device),
                  torch.full((B,), -1, dtype=torch.int32, device=prompt_lens.device))

    def step(self, counts: torch.Tensor, eos_block: torch.Tensor) -> None:
        """Apply one forward's unmask result and plan the next forward (no host sync)."""
        if self._impl is not None:
            self._impl.step(counts, eos_block)
        else:
            reference.pipeline_step(self._rows, self._blocks, counts, eos_block, *self._params)

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
