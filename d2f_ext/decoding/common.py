"""What every decoder takes and returns."""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Sequence

import torch


@dataclasses.dataclass
class DecodeOutput:
    """generated: int64 [B, max_new_tokens], every position the decoder wrote after the prompt
    (positions it never reached keep the mask id; an engine may stop after the first EOS).
    forwards: int64 [B], model forwards each row took."""

    generated: torch.Tensor
    forwards: torch.Tensor

    def tokens_before_eos(self, eos_id: Optional[int], stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Each row's tokens before its first ``eos_id`` or ``stop_token_ids`` token."""
        ends = (*stop_token_ids, *(() if eos_id is None else (eos_id,)))
        out = []
        for row in self.generated.tolist():
            at = first_of(row, ends, 0, len(row))
            out.append(row if at < 0 else row[:at])
        return out


def first_of(tokens: list[int], ids: Sequence[int], start: int, end: int) -> int:
    """The first index in [start, end) of any of ``ids`` in ``tokens``, or -1."""
    ends = set(ids)
    return next((i for i in range(start, end) if tokens[i] in ends), -1)


def split_eos(eos_token_id) -> tuple[Optional[int], tuple[int, ...]]:
    """(the EOS id the kernels pipeline on, the further ids that end the output as it does) of
    an ``eos_token_id`` setting, which transformers allows to be an id, a list of ids or None."""
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.reshape(-1).tolist()
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    ids = [t for t in ids if t is not None]
    # True is an int to Python, not a token id.
    if any(isinstance(t, bool) or not hasattr(type(t), "__index__") for t in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    ids = [operator.index(t) for t in ids]
    if not ids:
        return None, ()
    return ids[0], tuple(t for t in dict.fromkeys(ids[1:]) if t != ids[0])


def check_prompts(prompts: Sequence[Sequence[int]], mask_id: int, vocab: int,
                  max_len: int, max_new_tokens: int) -> list[list[int]]:
    """Prompts as lists of real token ids (no padding), validated."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("input_ids: at least one prompt is needed")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids: prompt {i} is empty")
        if mask_id in p:
            raise ValueError(f"input_ids: prompt {i} contains the mask token id {mask_id}")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids: prompt {i} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"input_ids: prompt {i} of {len(p)} tokens + max_new_tokens "
                             f"{max_new_tokens} exceeds the model's context of {max_len}")
    return prompts


def split_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Real tokens of each row of a (left- or right-) padded batch."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
