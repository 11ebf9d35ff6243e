"""HF-style ``generate`` for models loaded by d2f_ext, decoding with D2F by default.

Returns prompt + new tokens like transformers' generate: each row's tokens through its first EOS,
then ``pad_token_id``; with ``return_dict_in_generate=True`` a ModelOutput that also carries the
model forwards and the tokens per forward of each row.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

import torch
from transformers.utils import ModelOutput

from .config import D2FConfig
from .decoding import d2f_decode, reference_decode, vanilla_decode
from .decoding.common import split_padded

DECODERS = ("d2f", "fast-dllm", "vanilla", "reference")
_D2F_FIELDS = {f.name for f in dataclasses.fields(D2FConfig)}


@dataclasses.dataclass
class D2FGenerateOutput(ModelOutput):
    sequences: Optional[torch.Tensor] = None
    forwards: Optional[torch.Tensor] = None
    tokens_per_forward: Optional[torch.Tensor] = None
    new_tokens: Optional[torch.Tensor] = None


def _settings(model, generation_config, max_new_tokens, kwargs):
    """Merge generation_config, then explicit keyword arguments, into decoder settings."""
    s = {}
    if generation_config is not None:
        gc = generation_config.to_dict() if hasattr(generation_config, "to_dict") else dict(generation_config)
        s.update({k: v for k, v in gc.items() if v is not None})
    unknown = set(kwargs) - _D2F_FIELDS - {"do_sample", "eos_token_id", "pad_token_id"}
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s): {sorted(unknown)}")
    s.update(kwargs)
    if max_new_tokens is not None:
        s["max_new_tokens"] = max_new_tokens
    if not s.pop("do_sample", False):  # greedy, as in transformers: sampling settings are ignored
        for k in ("temperature", "top_k", "top_p"):
            s.pop(k, None)
    else:
        s.setdefault("temperature", 1.0)  # transformers' default when sampling
        # Unseeded sampling follows torch's global generator, so torch.manual_seed reproduces it.
        s.setdefault("seed", int(torch.randint(0, 2 ** 62, (1,))))
    eos = s.pop("eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    eos = model.config.eos_token_id if eos is None else int(eos)
    pad = s.pop("pad_token_id", None)
    pad = model.config.pad_token_id if pad is None else int(pad)
    pad = eos if pad is None else pad
    return s, eos, pad


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: Optional[int] = None, generation_config=None, streamer=None, *,
             decoder: str = "d2f", return_dict_in_generate: bool = False, steps: Optional[int] = None,
             stop_strings=None, tokenizer=None, **kwargs):
    """Generate with D2F (``decoder="d2f"``), Fast-dLLM mode (``"fast-dllm"``: one block at a
    time), vanilla decoding (``"vanilla"``, ``steps`` per generation) or the plain-PyTorch
    reference loop (``"reference"``). D2F parameters (block_size, block_add_threshold,
    decoded_token_threshold, skip_threshold, sampling_strategy, temperature, top_k, top_p, seed)
    come as keyword arguments or attributes of ``generation_config`` (default: the model's
    ``generation_config``, which AutoD2FModel reads from the checkpoint's generation_config.json).
    ``stop_strings`` (with the ``tokenizer`` that decodes the rows, as in transformers) ends each row
    after the first stop string it writes."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    prompts = split_padded(input_ids, attention_mask)
    if generation_config is None:  # as in transformers: the one loaded with the model
        generation_config = getattr(model, "generation_config", None)
    return_dict_in_generate |= bool(getattr(generation_config, "return_dict_in_generate", False))
    s, eos, pad = _settings(model, generation_config, max_new_tokens, kwargs)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= to decode the generated tokens, as in transformers")
    s = {k: v for k, v in s.items() if k in _D2F_FIELDS}
    if streamer is not None and len(prompts) != 1:
        raise ValueError("streamer supports batch size 1 only, as in transformers")
    feed = _StreamFeed(streamer, input_ids[0], model.config.mask_token_id, eos) if streamer else None
    if decoder == "vanilla":
        bs = s.get("block_size", 32)
        new = s.get("max_new_tokens", 128)
        out = vanilla_decode(model, prompts, max_new_tokens=new, block_size=bs,
                             steps=steps if steps is not None else new)
    else:
        cfg = D2FConfig.fast_dllm(**s) if decoder == "fast-dllm" else D2FConfig(**s)
        if decoder == "reference":
            out = reference_decode(model, prompts, cfg, eos_id=eos)
        else:
            out = d2f_decode(model, prompts, cfg, eos_id=eos, on_step=feed)
    if feed is not None:
        feed(out.generated, None)  # what is left (all of it, for decoders that do not stream)
    rows = out.tokens_before_eos(eos)
    hit = [len(r) < out.generated.shape[1] and int(out.generated[i, len(r)]) == eos
           if eos is not None else False for i, r in enumerate(rows)]
    if stop_strings:
        cut = [_through_stop(r, stop_strings, tokenizer) for r in rows]
        hit = [h and len(c) == len(r) for h, c, r in zip(hit, cut, rows)]
        rows = cut
    new_rows = [r + ([eos] if h else []) for r, h in zip(rows, hit)]
    width = max(len(r) for r in new_rows)
    new = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(new_rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    sequences = torch.cat([input_ids.cpu(), new], 1).to(input_ids.device)
    if streamer is not None:
        streamer.end()
    if not return_dict_in_generate:
        return sequences
    n_new = torch.tensor([len(r) for r in rows])
    return D2FGenerateOutput(sequences=sequences, forwards=out.forwards.cpu(),
                             tokens_per_forward=n_new / out.forwards.cpu().clamp(min=1),
                             new_tokens=n_new)


def _through_stop(row: list[int], stop_strings, tokenizer) -> list[int]:
    """The shortest prefix of ``row`` whose text contains a stop string (all of it if none does).
    Whether a prefix's text contains one only grows with its length, hence the bisection."""
    def stops(n):
        text = tokenizer.decode(row[:n])
        return any(s and s in text for s in stop_strings)

    if not stops(len(row)):
        return row
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stops(mid) else (mid + 1, hi)
    return row[:lo]


class _StreamFeed:
    """Feeds a transformers streamer the prompt, then each newly final prefix of row 0."""

    def __init__(self, streamer, prompt: torch.Tensor, mask_id: int, eos: Optional[int]):
        self.streamer, self.mask_id, self.eos, self.sent = streamer, mask_id, eos, 0
        self.done = False
        streamer.put(prompt.cpu())

    def __call__(self, generated: torch.Tensor, rows) -> None:
        if self.done:
            return
        row = generated[0].tolist()
        end = row.index(self.mask_id) if self.mask_id in row else len(row)
        if self.eos is not None and self.eos in row[:end]:
            end = row.index(self.eos) + 1
            self.done = True
        if end > self.sent:
            self.streamer.put(torch.tensor(row[self.sent:end]))
            self.sent = end


def patch(model):
    """Give a model loaded by d2f_ext a drop-in ``model.generate`` that decodes with D2F."""
    model.generate = types.MethodType(generate, model)
    return model
