"""d2f-serve: serve a checkpoint with OpenAI's completions and chat completions APIs."""

from __future__ import annotations

import argparse
import sys

import torch

from ..auto import AutoD2FModel
from ..cli import DEFAULT_MODEL
from ..models.loading import DTYPES, check_device
from .server import build_app, model_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2f-serve", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder (LLaDA or Dream) with its tokenizer; default: the shipped "
                        "D2F student, which answers grade-school math questions")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder merged into the model")
    p.add_argument("--served-model-name", help="the model name clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (engine rows)")
    p.add_argument("--max-len", type=int, help="positions per row, prompt + completion (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; beyond that the server answers 429")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float16 for GPUs without bfloat16")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if not 0 < a.port < 65536:
            raise ValueError(f"--port must be in [1, 65535], got {a.port}")
        check_device(a.device)
        # Only the engine's thread computes. libgomp keeps a worker pool per thread that has run a
        # parallel region and, once it manages more threads than there are cores, makes idle
        # workers sleep at once instead of spinning: had this thread (which then serves HTTP)
        # loaded the model with its own pool, every small op of the engine's steps would wake a
        # sleeping worker, and a CPU step took 2.2x as long as in a plain program.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        model = AutoD2FModel.from_pretrained(a.model, adapter=a.adapter, dtype=DTYPES[a.dtype], device=a.device)
        app = build_app(model, name=a.served_model_name or model_name(a.model), max_batch=a.max_batch,
                        max_len=a.max_len, max_queue=a.max_queue, threads=threads)
    except (ValueError, TypeError, OSError) as e:  # bad arguments or files: a message, not a traceback
        print(f"d2f-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
