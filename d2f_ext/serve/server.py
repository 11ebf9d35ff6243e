"""The served model's app (``build_app``) and a uvicorn server on a background thread
(``BackgroundServer``: for programs that serve and call themselves, as the tests do)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Optional

from ..config import D2FConfig
from ..decoding.common import split_eos
from ..engine import Engine, EngineConfig
from .app import create_app
from .engine_loop import EngineLoop
from .params import ModelInfo


def build_app(model, *, name: Optional[str] = None, max_batch: int = 8, max_len: Optional[int] = None,
              max_queue: int = 64, threads: Optional[int] = None):
    """The FastAPI app serving ``model`` (loaded by AutoD2FModel: its tokenizer and
    generation_config attached) on an engine of ``max_batch`` rows of ``max_len`` positions
    (default the model's context), stepped with ``threads`` torch threads (default: this
    thread's count); the block size is the generation_config's."""
    mc = model.config
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("model: serving text needs the checkpoint's tokenizer, and it has none")
    gc = getattr(model, "generation_config", None)
    block_size = getattr(gc, "block_size", None) or D2FConfig.block_size
    length = mc.max_position_embeddings if max_len is None else max_len
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_len=length, block_size=block_size))
    eos, stop_ids = split_eos(getattr(gc, "eos_token_id", None))
    info = ModelInfo(name=name or "d2f", tokenizer=model.tokenizer, generation_config=gc,
                     block_size=block_size, max_len=engine.max_len, vocab_size=mc.vocab_size,
                     mask_token_id=mc.mask_token_id, eos_id=eos, stop_token_ids=stop_ids)
    return create_app(EngineLoop(engine, max_queue=max_queue, threads=threads), info)


def model_name(path: str) -> str:
    """The name clients ask for: the checkpoint folder's name."""
    return os.path.basename(os.path.normpath(path))


class BackgroundServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, on a daemon thread; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app, self.host, self.port, self.timeout = app, host, port, timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="d2f-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"d2f-serve did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
