"""The one thread that owns the Engine.

The engine is not thread-safe, so the server's event loop never touches it: a route submits a
request (or an abort) into a thread-safe queue and awaits the request's own asyncio queue, which
this thread fills, through ``loop.call_soon_threadsafe``, with what each step made final. The
thread steps while any request is queued or decoding and sleeps on the command queue otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Optional, Sequence

import torch

from ..config import D2FConfig, is_int
from ..engine import Engine


class QueueFull(Exception):
    """Every row is taken and the waiting queue holds --max-queue requests."""


class EngineDown(Exception):
    """The engine failed and could not even abort its requests (a device error that sticks):
    it takes no more requests."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step made final for a request: its new output tokens; ``finish_reason`` ("stop",
    "length", "abort", or "error" with ``error``) once it ended, with its model forwards."""

    new_tokens: tuple[int, ...]
    finish_reason: Optional[str] = None
    forwards: int = 0
    error: Optional[str] = None


class Handle:
    """A submitted request as its route sees it: ``events`` yields its Events in order."""

    def __init__(self, prompt: list[int], cfg: D2FConfig, stop: tuple[str, ...], eos_id: Optional[int],
                 loop: asyncio.AbstractEventLoop, max_tokens: Optional[int] = None,
                 stop_token_ids: tuple[int, ...] = ()):
        self.prompt, self.cfg, self.stop, self.eos_id, self.max_tokens = prompt, cfg, stop, eos_id, max_tokens
        self.stop_token_ids = stop_token_ids
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.request = None  # the engine's Request, set on the engine thread
        self.released = False

    def _deliver(self, event: Event) -> None:
        _deliver_all(self.loop, [(self, event)])


def _put_all(batch: list[tuple[Handle, Event]]) -> None:
    for handle, event in batch:
        handle.events.put_nowait(event)


def _deliver_all(loop: asyncio.AbstractEventLoop, batch: list[tuple[Handle, Event]]) -> None:
    """Hands events to their handles' queues on their event loop (from the engine thread)."""
    try:
        loop.call_soon_threadsafe(_put_all, batch)
    except RuntimeError:  # the routes' event loop is closed: nobody is listening any more
        pass


class EngineLoop:
    """Runs ``engine`` on a daemon thread with ``threads`` torch threads (default: the creating
    thread's count); ``max_queue`` requests may wait for a row beyond the engine's ``max_batch``
    decoding ones (a request counts until its route releases it)."""

    def __init__(self, engine: Engine, max_queue: int = 64, threads: Optional[int] = None):
        if not is_int(max_queue) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.engine = engine
        self.threads = torch.get_num_threads() if threads is None else threads
        self.capacity = engine.config.max_batch + max_queue
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self._outstanding = 0
        # Time inside engine.step, against wall time, tells the engine's share of serving.
        self.steps, self.step_seconds = 0, 0.0
        self.down: Optional[str] = None  # why the engine takes no more requests
        self._thread: Optional[threading.Thread] = None

    # --- called from the server's event loop ------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(self.threads,),
                                            name="d2f-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is in flight and end the thread."""
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt: Sequence[int], cfg: D2FConfig, *, stop: Sequence[str] = (),
               eos_id: Optional[int] = None, loop: Optional[asyncio.AbstractEventLoop] = None,
               max_tokens: Optional[int] = None, stop_token_ids: Sequence[int] = ()) -> Handle:
        """Queue a validated request; raises QueueFull when the server holds ``capacity`` already,
        EngineDown once the engine is down."""
        if self.down is not None:
            raise EngineDown(self.down)
        with self._lock:
            if self._outstanding >= self.capacity:
                raise QueueFull(f"the server holds {self._outstanding} requests, its limit "
                                f"(--max-batch + --max-queue); retry later")
            self._outstanding += 1
        handle = Handle(list(prompt), cfg, tuple(stop), eos_id, loop or asyncio.get_running_loop(), max_tokens,
                        tuple(stop_token_ids))
        self._commands.put(("add", handle))
        return handle

    def abort(self, handle: Handle) -> None:
        """Cancel the request (a no-op once it ended); its row is free for the next step."""
        self._commands.put(("abort", handle))

    def release(self, handle: Handle) -> None:
        """The route is done with the request: abort it if still running, and stop counting it."""
        if handle.released:
            return
        handle.released = True
        self.abort(handle)
        with self._lock:
            self._outstanding -= 1

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # --- the engine thread --------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        # A new thread starts from OpenMP's default count (the machine's cores), not the
        # creating thread's setting.
        torch.set_num_threads(threads)
        while True:
            # Sleep on the queue only when there is nothing to decode.
            block = not self.engine.has_work()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all("the server is shutting down", reason="abort")
                    return
                try:
                    self._apply(*command)
                except Exception as e:  # an abort that fails: as a failed step
                    if self._engine_failed(e):
                        return self._refuse()
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_work():
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must not hang every client: each gets the error
                if self._engine_failed(e):
                    return self._refuse()
                continue
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0
            news: dict[asyncio.AbstractEventLoop, list] = {}
            for o in outputs:
                r = o.request
                handle = self._handles.get(r.id)
                if handle is None:
                    continue
                if r.finished:
                    del self._handles[r.id]
                news.setdefault(handle.loop, []).append((handle, Event(tuple(o.new_tokens), r.finish_reason, r.forwards)))
            # One wake-up of each event loop per step, not one per request: each wake-up hands
            # the GIL to the loop's thread while this one waits to take it back.
            for loop, batch in news.items():
                _deliver_all(loop, batch)

    def _apply(self, kind: str, handle: Handle) -> None:
        if kind == "add":
            if handle.released:  # the client left before its request reached the engine
                return
            try:
                r = self.engine.add_request(handle.prompt, handle.cfg, eos_id=handle.eos_id, stop=handle.stop,
                                            max_tokens=handle.max_tokens, stop_token_ids=handle.stop_token_ids)
            except Exception as e:  # this request fails, not the thread every client waits on
                handle._deliver(Event((), "error", error=f"the engine refused the request: {type(e).__name__}: {e}"))
                return
            handle.request = r
            self._handles[r.id] = handle
        elif kind == "abort":
            r = handle.request
            if r is not None and not r.finished:
                self.engine.abort(r)
                del self._handles[r.id]
                handle._deliver(Event((), "abort", r.forwards))

    def _engine_failed(self, e: Exception) -> bool:
        """Every request ends with ``e``; True when the engine is down."""
        self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
        return self.down is not None

    def _fail_all(self, message: str, reason: str = "error") -> None:
        """End every request with ``message``. Each client hears first: aborting them may fail
        too, and then the engine is down (its rows cannot be trusted)."""
        handles = list(self._handles.values())
        self._handles.clear()
        for handle in handles:
            handle._deliver(Event((), reason, handle.request.forwards, error=message))
        try:
            for handle in handles:
                self.engine.abort(handle.request)
        except Exception as e:
            self.down = f"{message}; aborting its requests then failed: {type(e).__name__}: {e}"

    def _refuse(self) -> None:
        """The engine is down: answer what is still queued with the error until told to stop."""
        while True:
            kind, handle = self._commands.get()
            if kind == "stop":
                return
            if kind == "add":
                handle._deliver(Event((), "error", error=self.down))
