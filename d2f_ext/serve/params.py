"""A request's prompt ids and D2F decoding settings, checked against the model, with each
rejection naming the parameter at fault (a 400, before anything reaches the engine)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from ..config import D2FConfig
from ..engine import canvas_for
from .errors import APIError
from .protocol import SamplingFields

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_TOKEN_IDS = 64  # a bound on what one request can make the engine hold
# OpenAI fields this server does not implement, with the values that ask for nothing (which
# clients may send explicitly).
UNSUPPORTED = {"echo": (False,), "logprobs": (False,), "top_logprobs": (0,), "best_of": (1,), "suffix": ("",),
               "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
               "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",)}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the routes need to know about the served model."""

    name: str
    tokenizer: object
    generation_config: object  # the checkpoint's GenerationConfig, or None
    block_size: int  # the engine's
    max_len: int  # positions per row: prompt + generation
    vocab_size: int
    mask_token_id: int
    eos_id: Optional[int]  # None: the model's
    stop_token_ids: tuple[int, ...] = ()  # more ids that end the output (generation_config's list)


def prompt_ids(info: ModelInfo, prompt: Union[str, list[int]], param: str) -> list[int]:
    if isinstance(prompt, str):
        ids = info.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # Special-token text tokenises to its id, so text can carry the mask token too.
        if info.mask_token_id in ids:
            mask = info.tokenizer.decode([info.mask_token_id], skip_special_tokens=False)
            raise APIError(400, f"{param}: the text holds the mask token {mask!r}, which the model "
                                f"decodes in place of its output", param)
    else:
        bad = [t for t in prompt if not 0 <= t < info.vocab_size or t == info.mask_token_id]
        if bad:
            raise APIError(400, f"{param}: token ids must be in [0, {info.vocab_size}) and not the mask id "
                                f"{info.mask_token_id}; got {bad[:5]}", param)
        ids = list(prompt)
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param)
    if len(ids) >= info.max_len:
        raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; the context holds {info.max_len} "
                            f"(prompt + completion)", param, "context_length_exceeded")
    return ids


def chat_prompt_ids(info: ModelInfo, messages: list[dict]) -> list[int]:
    tok = info.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, f"model {info.name} has no chat template; use /v1/completions", "messages")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt_ids(info, text, "messages")


def unsupported_fields(req: SamplingFields) -> None:
    """Rejects an OpenAI field this server cannot honour, unless it holds its default."""
    for name, defaults in UNSUPPORTED.items():
        value = getattr(req, name, None)
        # Typed: 0 would equal False, and logprobs 0 still asks for the chosen tokens' logprobs.
        if value is not None and not any(type(value) is type(d) and value == d for d in defaults):
            raise APIError(400, f"{name}: not supported by this server, got {value!r}", name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream", "stream_options")


def decoding_config(info: ModelInfo, req: SamplingFields, prompt_len: int,
                    max_tokens: Optional[int] = None, max_tokens_param: str = "max_tokens") -> tuple[D2FConfig, int]:
    """The request's settings over the model's generation_config, and the completion's bound:
    ``max_tokens`` (default the generation_config's max_new_tokens, cut to what the context
    leaves). D2F decodes whole blocks, so the canvas is the blocks that cover the bound, and the
    engine ends the request at the bound. Errors about it name ``max_tokens_param``, the field
    the client sent."""
    if req.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported, got {req.n}", "n")
    bs = info.block_size
    room = info.max_len - prompt_len
    room = room if room < bs else room // bs * bs  # whole blocks, or one shorter block
    if max_tokens is None:
        default = getattr(info.generation_config, "max_new_tokens", None) or D2FConfig.max_new_tokens
        max_tokens = min(default, room)
    elif not 1 <= max_tokens <= room:
        raise APIError(400, f"{max_tokens_param}: must be in [1, {room}] (the context of {info.max_len} less "
                            f"the prompt's {prompt_len} tokens, in whole blocks of {bs}), got {max_tokens}",
                       max_tokens_param)
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature: must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p: must be in (0, 1], got {req.top_p}", "top_p")
    if req.seed is not None and req.seed < 0:
        raise APIError(400, f"seed: must be >= 0, got {req.seed}", "seed")
    # As in OpenAI, whose temperature defaults to 1: top_p or seed alone asks for sampling.
    if req.temperature is None:
        sample = True if req.top_p is not None or req.seed is not None else None
    else:
        sample = req.temperature > 0
    try:
        cfg = D2FConfig.from_generation_config(info.generation_config,
                                               max_new_tokens=canvas_for(max_tokens, bs), block_size=bs,
                                               do_sample=sample,
                                               temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return cfg, max_tokens


def stop_strings(req: SamplingFields) -> tuple[str, ...]:
    stop = req.stop
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}", "stop")
    return stop


def stop_token_ids(info: ModelInfo, req: SamplingFields) -> tuple[int, ...]:
    """The model's further EOS ids, then the request's ``stop_token_ids``."""
    ids = req.stop_token_ids or []
    bad = [t for t in ids if not 0 <= t < info.vocab_size or t == info.mask_token_id]
    if bad or len(ids) > MAX_STOP_TOKEN_IDS:
        raise APIError(400, f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids in [0, {info.vocab_size}) "
                            f"other than the mask token {info.mask_token_id}, got {ids!r}", "stop_token_ids")
    return tuple(dict.fromkeys((*info.stop_token_ids, *ids)))
