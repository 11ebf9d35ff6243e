"""HF-style ``generate`` for models loaded by d2f_ext, decoding with D2F by default.

Returns prompt + new tokens like transformers' generate: each row's tokens through its first EOS
(or through the token that completes a stop string), then ``pad_token_id``; with
``return_dict_in_generate=True`` a ModelOutput that also carries the model forwards and the
tokens per forward of each row. The D2F decoders run on the model's long-lived
:class:`d2f_ext.engine.Engine`, so a second call of the same shapes allocates nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Optional

import torch
from transformers.utils import ModelOutput

from .config import D2FConfig
from .decoding import DECODERS, check_steps, decode
from .decoding.common import split_eos, split_padded
from .engine import canvas_for, engine_for, first_stop

_D2F_FIELDS = {f.name for f in dataclasses.fields(D2FConfig)}
_ENGINE_DECODERS = ("d2f", "fast-dllm")
# The settings only the threshold decoders (d2f, fast-dllm, reference) read; vanilla is greedy.
THRESHOLD_SETTINGS = ("block_add_threshold", "decoded_token_threshold", "skip_threshold", "sampling_strategy")
_SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "seed")


@dataclasses.dataclass
class D2FGenerateOutput(ModelOutput):
    sequences: Optional[torch.Tensor] = None
    forwards: Optional[torch.Tensor] = None
    tokens_per_forward: Optional[torch.Tensor] = None
    new_tokens: Optional[torch.Tensor] = None


def merged_generation_config(model, generation_config=None):
    """The model's generation config with the fields ``generation_config`` sets laid over it, as
    transformers merges a passed GenerationConfig (a dict works too)."""
    base = getattr(model, "generation_config", None)
    if generation_config is None:
        return base
    given = (generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict")
             else dict(generation_config))
    if base is None:
        return given
    merged = copy.deepcopy(base)
    # GenerationConfig.update sets only the attributes the base already has, so the D2F fields a
    # checkpoint's generation_config.json leaves out would be dropped.
    for k, v in given.items():
        setattr(merged, k, v)
    return merged


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: Optional[int] = None, generation_config=None, streamer=None, *,
             decoder: str = "d2f", return_dict_in_generate: bool = False, steps: Optional[int] = None,
             stop_strings=None, tokenizer=None, max_length: Optional[int] = None, **kwargs):
    """Generate with D2F (``decoder="d2f"``), Fast-dLLM mode (``"fast-dllm"``: one block at a
    time), vanilla decoding (``"vanilla"``, ``steps`` per generation) or the plain-PyTorch
    reference loop (``"reference"``). D2F parameters (block_size, block_add_threshold,
    decoded_token_threshold, skip_threshold, sampling_strategy, temperature, top_k, top_p, seed)
    come as keyword arguments or attributes of ``generation_config``, laid over the model's own
    (which AutoD2FModel reads from the checkpoint's generation_config.json). ``stop_strings``
    (with ``tokenizer``, default the model's) end a row once its text holds one (the engine's
    decoders stop decoding it there; vanilla and reference cut it afterwards); ``max_length``
    counts the prompt (its padded width, as in transformers), ``max_new_tokens`` wins over it."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    prompts = split_padded(input_ids, attention_mask)
    unknown = set(kwargs) - _D2F_FIELDS - {"do_sample", "eos_token_id", "pad_token_id"}
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s): {sorted(unknown)}")
    # Settings the chosen decoder has no use for are refused: silently dropping them would decode
    # otherwise than asked.
    check_steps(decoder, steps)
    if decoder == "vanilla":
        unused = sorted(k for k in THRESHOLD_SETTINGS + _SAMPLING_SETTINGS if kwargs.get(k) is not None)
        unused += ["do_sample"] if kwargs.get("do_sample") else []
        if unused:
            raise ValueError(f"decoder='vanilla' (greedy, steps per block) takes no {unused}")
    if decoder == "fast-dllm" and kwargs.get("block_add_threshold") not in (None, 1.0):
        raise ValueError(f"decoder='fast-dllm' decodes one block at a time (block_add_threshold=1), "
                         f"got block_add_threshold={kwargs['block_add_threshold']!r}")
    gc = merged_generation_config(model, generation_config)
    get = (gc.get if isinstance(gc, dict) else (lambda k, d=None: getattr(gc, k, d))) if gc is not None \
        else (lambda k, d=None: d)
    return_dict_in_generate |= bool(get("return_dict_in_generate", False))
    if max_new_tokens is None and max_length is not None:
        max_new_tokens = max_length - input_ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"max_length ({max_length}) must exceed the input length ({input_ids.shape[1]})")
    eos = kwargs.pop("eos_token_id", None)
    eos = get("eos_token_id") if eos is None else eos
    # A list (Llama 3, LLaDA-Instruct) ends a row at any of its ids: the first is the EOS the
    # kernels pipeline on, the others end the output as it does.
    eos, stop_ids = split_eos(eos)
    if eos is None:
        eos, stop_ids = split_eos(model.config.eos_token_id)
    pad = kwargs.pop("pad_token_id", None)
    pad = get("pad_token_id") if pad is None else pad
    pad = model.config.pad_token_id if pad is None else int(pad)
    pad = eos if pad is None else pad
    cfg = D2FConfig.from_generation_config(gc, max_new_tokens=max_new_tokens, **kwargs)
    # As in transformers, max_new_tokens bounds the output exactly, also between whole blocks:
    # the threshold decoders decode the blocks that cover it and the output is cut there (vanilla
    # takes whole blocks only, and says so).
    bound = cfg.max_new_tokens
    if decoder != "vanilla":
        cfg = dataclasses.replace(cfg, max_new_tokens=canvas_for(bound, cfg.block_size))
    stop = stop_strings if stop_strings is not None else get("stop_strings")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if stop and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= (the model has none) to read the generated text")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("streamer supports batch size 1 only, as in transformers")
    if streamer is not None:
        streamer.put(input_ids[0].cpu())

    if decoder in _ENGINE_DECODERS:
        if decoder == "fast-dllm":
            cfg = D2FConfig.fast_dllm(**dataclasses.asdict(cfg))
        engine = engine_for(model, cfg.block_size, len(prompts), max(map(len, prompts)) + cfg.max_new_tokens)
        engine.tokenizer = tokenizer
        on_step = None
        if streamer is not None:
            # Requests already in the shared engine (another caller's, or one an interrupted call
            # left) decode beside this call's: their tokens are not this stream's.
            others = {r for r in (*engine.slots, *engine.waiting) if r is not None}

            def on_step(outputs):
                for o in outputs:
                    if o.request in others:
                        continue
                    end = o.request.end_token if o.finished else None
                    tail = [] if end is None else [end]
                    if o.new_tokens or tail:
                        streamer.put(torch.tensor(o.new_tokens + tail))
        out, requests = engine.decode(prompts, cfg, eos_id=eos, stop=stop, on_step=on_step, max_tokens=bound,
                                      stop_token_ids=stop_ids)
        rows = [r.output for r in requests]
        ends = [r.end_token for r in requests]
    else:
        out = decode(model, prompts, cfg, decoder=decoder, eos_id=eos, steps=steps)
        rows = out.tokens_before_eos(eos, stop_ids)
        # A row shorter than its region stopped at an end token.
        ends = [g[len(r)] if len(r) < min(bound, len(g)) else None for g, r in zip(out.generated.tolist(), rows)]
        rows = [r[:bound] for r in rows]
        if stop:  # these decoders run to the end: the rows are cut afterwards
            cuts = [first_stop(r, stop, tokenizer) for r in rows]
            ends = [e if c is None else None for e, c in zip(ends, cuts)]
            rows = [r if c is None else r[:c[0]] for r, c in zip(rows, cuts)]
        if streamer is not None:
            streamer.put(torch.tensor(rows[0] + ([] if ends[0] is None else [ends[0]])))
    new_rows = [r + ([] if e is None else [e]) for r, e in zip(rows, ends)]
    width = max(len(r) for r in new_rows)
    new = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(new_rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    sequences = torch.cat([input_ids.cpu().long(), new], 1).to(input_ids.device)
    if streamer is not None:
        streamer.end()
    if not return_dict_in_generate:
        return sequences
    n_new = torch.tensor([len(r) for r in rows])
    forwards = out.forwards.cpu()
    return D2FGenerateOutput(sequences=sequences, forwards=forwards,
                             tokens_per_forward=n_new / forwards.clamp(min=1), new_tokens=n_new)


def patch(model):
    """Give a model loaded by d2f_ext a drop-in ``model.generate`` that decodes with D2F."""
    model.generate = types.MethodType(generate, model)
    return model
