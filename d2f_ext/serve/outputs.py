"""A submitted request's events as text deltas, and its usage, for the routes to format."""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Optional

from .detokenize import TextStream
from .engine_loop import EngineLoop, Handle
from .errors import APIError
from .protocol import Usage


@dataclasses.dataclass
class Delta:
    """New text; on the last one, why the request ended and its usage."""

    text: str
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None


async def deltas(engine_loop: EngineLoop, handle: Handle, tokenizer) -> AsyncIterator[Delta]:
    """The request's text as it becomes final. Releases the request when done, also when the
    consumer stops early (a client that disconnects: its row is freed for the next step)."""
    text = TextStream(tokenizer, handle.stop)
    completion_tokens = 0
    try:
        while True:
            event = await handle.events.get()
            completion_tokens += len(event.new_tokens)
            if event.finish_reason == "error":
                raise APIError(500, event.error or "the engine failed")
            if event.finish_reason is None:
                delta = text.feed(event.new_tokens)
                if delta:
                    yield Delta(delta)
                continue
            rest = text.finish(event.new_tokens, stopped=event.finish_reason == "stop")
            n = len(handle.prompt)
            usage = Usage(prompt_tokens=n, completion_tokens=completion_tokens,
                          total_tokens=n + completion_tokens, forwards=event.forwards,
                          tokens_per_forward=round(completion_tokens / max(event.forwards, 1), 4))
            yield Delta(rest, event.finish_reason, usage)
            return
    finally:
        engine_loop.release(handle)


async def collect(engine_loop: EngineLoop, handle: Handle, tokenizer) -> Delta:
    """The whole completion as one Delta."""
    parts = []
    async for d in deltas(engine_loop, handle, tokenizer):
        parts.append(d.text)
        if d.finish_reason is not None:
            return Delta("".join(parts), d.finish_reason, d.usage)
    raise APIError(500, "the request ended without a result")
