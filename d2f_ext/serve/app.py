"""The FastAPI app: OpenAI's routes over an EngineLoop (``create_app``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import errors
from .engine_loop import EngineDown, EngineLoop, Handle, QueueFull
from .errors import APIError
from .outputs import Delta, collect, deltas
from .params import (ModelInfo, chat_prompt_ids, decoding_config, prompt_ids, stop_strings, stop_token_ids,
                     unsupported_fields)
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, ChatResponseMessage, CompletionChoice,
                       CompletionRequest, CompletionResponse, ModelCard, ModelList, SamplingFields,
                       new_id, now)

T = TypeVar("T")
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


def create_app(engine_loop: EngineLoop, info: ModelInfo) -> FastAPI:
    """The app; its lifespan starts and stops ``engine_loop``'s thread."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="d2f-serve", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    errors.install(app)
    created = now()

    def submit(req: SamplingFields, ids: list[int], max_tokens, max_tokens_param: str = "max_tokens"):
        if req.model != info.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {info.name!r}",
                           "model", "model_not_found")
        unsupported_fields(req)
        cfg, bound = decoding_config(info, req, len(ids), max_tokens, max_tokens_param)
        stop, stop_ids = stop_strings(req), stop_token_ids(info, req)
        try:
            return engine_loop.submit(ids, cfg, stop=stop, eos_id=info.eos_id, max_tokens=bound,
                                      stop_token_ids=stop_ids)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except EngineDown as e:
            raise APIError(503, str(e), code="engine_down") from None

    @app.get("/health")
    async def health():
        """503 once the engine is down, so that a load balancer or supervisor replaces it."""
        e = engine_loop.engine
        state = {"status": "ok", "active": e.num_active, "waiting": e.num_waiting,
                 "outstanding": engine_loop.outstanding, "steps": engine_loop.steps,
                 "step_seconds": engine_loop.step_seconds}
        if engine_loop.down is not None:
            return JSONResponse({**state, "status": "error", "error": engine_loop.down}, status_code=503)
        return state

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=info.name, created=created)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        ids = prompt_ids(info, req.prompt, "prompt")
        handle = submit(req, ids, req.max_tokens)
        rid = new_id("cmpl")
        if req.stream:
            def chunk(d: Delta, usage_only: bool = False) -> dict:
                choices = [] if usage_only else [CompletionChoice(text=d.text, finish_reason=d.finish_reason)]
                return CompletionResponse(id=rid, created=now(), model=info.name, choices=choices,
                                          usage=d.usage if usage_only else None).model_dump()

            return _sse(engine_loop, handle, info, chunk, req)
        d = await _unless_disconnected(request, collect(engine_loop, handle, info.tokenizer))
        return CompletionResponse(id=rid, created=now(), model=info.name, usage=d.usage,
                                  choices=[CompletionChoice(text=d.text, finish_reason=d.finish_reason)])

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        ids = chat_prompt_ids(info, [m.model_dump() for m in req.messages])
        if req.max_completion_tokens is not None:
            handle = submit(req, ids, req.max_completion_tokens, "max_completion_tokens")
        else:
            handle = submit(req, ids, req.max_tokens)
        rid = new_id("chatcmpl")
        if req.stream:
            def chunk(d: Delta, usage_only: bool = False) -> dict:
                choices = [] if usage_only else [ChatChunkChoice(delta=ChatDelta(content=d.text),
                                                                 finish_reason=d.finish_reason)]
                return ChatCompletionChunk(id=rid, created=now(), model=info.name, choices=choices,
                                           usage=d.usage if usage_only else None).model_dump(exclude_none=True)

            first = ChatCompletionChunk(id=rid, created=now(), model=info.name,
                                        choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
            return _sse(engine_loop, handle, info, chunk, req, first.model_dump(exclude_none=True))
        d = await _unless_disconnected(request, collect(engine_loop, handle, info.tokenizer))
        return ChatCompletionResponse(id=rid, created=now(), model=info.name, usage=d.usage,
                                      choices=[ChatChoice(message=ChatResponseMessage(content=d.text),
                                                          finish_reason=d.finish_reason)])

    return app


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, cancelled if the client leaves first: uvicorn does not cancel a plain
    route on disconnect, so the request would hold its row until it finished (collect's
    cleanup releases it on cancellation)."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL))[0]:
            if await request.is_disconnected():
                raise APIError(499, "the client disconnected")  # nobody reads it; nginx's code
        return task.result()
    finally:
        task.cancel()  # a no-op once done


class _Stream(StreamingResponse):
    """Releases the request however the response ends: Starlette cancels the body when the
    client disconnects, possibly before the body started (so its own cleanup never ran)."""

    def __init__(self, content, release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _sse(engine_loop: EngineLoop, handle: Handle, info: ModelInfo, chunk: Callable[..., dict],
         req: SamplingFields, first: dict | None = None) -> StreamingResponse:
    """Server-sent events in OpenAI's format: one ``data: {chunk}`` per delta, a usage chunk when
    ``stream_options.include_usage``, then ``data: [DONE]``."""
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    source = deltas(engine_loop, handle, info.tokenizer)

    async def events():
        def data(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        if first is not None:
            yield data(first)
        try:
            async for d in source:
                if d.text or d.finish_reason is not None:
                    yield data(chunk(d))
                if d.finish_reason is not None and include_usage:
                    yield data(chunk(d, usage_only=True))
        except APIError as e:  # the status line has gone out: the error travels as an event
            yield data(errors.error_payload(e.message, e.status))
        finally:
            await source.aclose()
        yield "data: [DONE]\n\n"

    return _Stream(events(), lambda: engine_loop.release(handle))
