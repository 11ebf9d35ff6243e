"""Serving benchmark: d2f-serve on the shipped model against decoding the same requests one at a time.

The server runs as its own process (``d2f-serve``, as deployed, with --threads torch threads) and
N clients (1, 4, 16, 64) send the same chat requests (grade-school math questions, the shipped
model's task), streamed, each client one request after another.
Per number of clients: generated tokens/s (all completion tokens over the wall time), time to
first token (from sending to the first text chunk; median and p90), request latency, and the
share of wall time the server spent inside the engine's steps (the rest is HTTP, tokenizing and
waiting), tokens per engine step against the in-process engine's (rows left idle between a
client's requests), and the CPU cores the clients, the server's HTTP thread and its engine
threads each took (they share the machine). The baseline is ``model.generate`` on each request
alone in this process, with the same threads and the server idle, measured right before the
server. Beside it, the same batching without the server: an engine of N rows in this process fed
by N emulated clients, what serving would give with no HTTP, no client and no thread beside the
engine's. Each level runs --repeat rounds of the three, and the round of median server speedup
is reported, whole, with every round's speedup: this machine's speed drifts between minutes.
Greedy outputs are compared with the baseline's, request by request. Prints a table, writes
JSON, a markdown table and a plot.

    python -m d2f_bench.serve [--requests 256] [--clients 1 4 16 64] [--threads 2] [--repeat 3] [--out results/serve]
    python -m d2f_bench.serve --small   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import torch

from d2f_bench.common import environment, torch_threads, write_json, write_markdown
from d2f_ext import AutoD2FModel
from d2f_ext.cli import DEFAULT_MODEL
from d2f_ext.config import D2FConfig
from d2f_ext.engine import Engine, EngineConfig, canvas_for

NAME = "d2f-math"
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Max", "Ivy", "Sam"]


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who = rng.choice(NAMES)
        a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(1, 9)
        out.append(f"{who} has {a} apples. {who} buys {b} more apples and then gives {c} of them. "
                   f"How many apples does {who} have now?")
    return out


class FirstToken:
    """A generate streamer that notes when the first generated tokens arrive (its first put is the prompt)."""

    def __init__(self):
        self.t0, self.puts, self.first = time.perf_counter(), 0, None

    def put(self, _):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def canvas(model, max_tokens: int) -> int:
    """The new tokens a server request of ``max_tokens`` decodes (the server ends it there)."""
    return canvas_for(max_tokens, D2FConfig.from_generation_config(model.generation_config).block_size)


def alone(model, prompts: list[str], max_tokens: int) -> dict:
    """model.generate on each request alone, as the server decodes it: texts, tokens, seconds,
    first-token times."""
    tok = model.tokenizer
    texts, tokens, ttft = [], 0, []
    t0 = time.perf_counter()
    for q in prompts:
        ids = torch.tensor([chat_ids(tok, q)])
        streamer = FirstToken()
        out = model.generate(ids, max_new_tokens=canvas(model, max_tokens), streamer=streamer,
                             return_dict_in_generate=True)
        n = min(int(out.new_tokens[0]), max_tokens)
        tokens += n
        texts.append(tok.decode(out.sequences[0, ids.shape[1]: ids.shape[1] + n], skip_special_tokens=True))
        ttft.append(streamer.first)
    return {"texts": texts, "tokens": tokens, "seconds": time.perf_counter() - t0, "ttft": ttft}


def in_process(model, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """The server's batching without the server: an engine of ``clients`` rows in this process,
    each emulated client adding its next request as soon as its last one ends. Tokens, seconds."""
    cfg = D2FConfig.from_generation_config(model.generation_config, max_new_tokens=canvas(model, max_tokens))
    engine = Engine(model, EngineConfig(max_batch=clients, max_len=model.config.max_position_embeddings,
                                        block_size=cfg.block_size))
    todo = [chat_ids(model.tokenizer, q) for q in prompts]
    t0 = time.perf_counter()
    running = [engine.add_request(todo.pop(0), cfg, max_tokens=max_tokens) for _ in range(min(clients, len(todo)))]
    done, steps = [], 0
    while running:
        engine.step()
        steps += 1
        for r in [r for r in running if r.finished]:
            running.remove(r)
            done.append(r)
            if todo:
                running.append(engine.add_request(todo.pop(0), cfg, max_tokens=max_tokens))
    return {"tokens": sum(len(r.output) for r in done), "seconds": time.perf_counter() - t0, "steps": steps}


class CPUShares:
    """CPU cores taken between ``start`` and ``stop`` by this process (the clients), the server's
    main thread (HTTP) and its other threads (the engine's and its OpenMP workers)."""

    def __init__(self, server_pid: int):
        import psutil

        self.me, self.server = psutil.Process(), psutil.Process(server_pid)

    def _read(self):
        mine = self.me.cpu_times()
        threads = {t.id: t.user_time + t.system_time for t in self.server.threads()}
        http = threads.pop(self.server.pid, 0.0)  # the main thread's id is the process's
        return time.perf_counter(), mine.user + mine.system, http, sum(threads.values())

    def start(self):
        self.t0 = self._read()

    def stop(self) -> dict:
        t1 = self._read()
        wall = t1[0] - self.t0[0]
        return {name: (b - a) / wall for name, a, b in zip(("clients", "http", "engine"), self.t0[1:], t1[1:])}


async def serve_level(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """The requests through ``clients`` concurrent streaming clients: aiohttp sessions that read
    d2f-serve's server-sent events line by line, light because they share the engine's cores
    (the ``openai`` package's client, which the tests use, takes several times the CPU)."""
    import aiohttp

    results = [None] * len(prompts)
    order = iter(range(len(prompts)))

    async def client(session):
        for i in order:
            body = {"model": NAME, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, parts, usage = None, [], None
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"d2f-serve answered {response.status}: {await response.text()}")
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[len(b"data: "):])
                    if "error" in chunk:
                        raise RuntimeError(f"d2f-serve failed request {i}: {chunk['error']['message']}")
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = first if first is not None else time.perf_counter() - t0
                        parts.append(chunk["choices"][0]["delta"]["content"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            if usage is None:
                raise RuntimeError(f"d2f-serve ended request {i}'s stream without a usage chunk")
            latency = time.perf_counter() - t0
            # A request that produced no text has its first token at its end.
            results[i] = {"text": "".join(parts), "ttft": latency if first is None else first,
                          "latency": latency, "tokens": usage["completion_tokens"]}

    # No cap on connections (aiohttp's default is 100): each client keeps one open.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    return {"texts": [r["text"] for r in results], "tokens": sum(r["tokens"] for r in results),
            "seconds": seconds, "ttft": [r["ttft"] for r in results], "latency": [r["latency"] for r in results]}


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "d2f_ext.serve.cli", "--model", model, "--served-model-name", NAME,
                             "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"d2f-serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            health(url)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("d2f-serve did not start within 120 s")


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]


def row(clients: int, base: dict, level: dict, inproc: dict, engine_seconds: float, steps: int, cpu: dict) -> dict:
    tps, base_tps = level["tokens"] / level["seconds"], base["tokens"] / base["seconds"]
    inproc_tps = inproc["tokens"] / inproc["seconds"]
    return {"clients": clients, "tokens": level["tokens"], "seconds": level["seconds"], "tokens_per_s": tps,
            "alone_tokens_per_s": base_tps, "speedup": tps / base_tps,
            "in_process_tokens_per_s": inproc_tps, "in_process_speedup": inproc_tps / base_tps,
            "ttft_median_s": statistics.median(level["ttft"]), "ttft_p90_s": quantile(level["ttft"], 0.9),
            "latency_median_s": statistics.median(level["latency"]),
            "alone_ttft_median_s": statistics.median(base["ttft"]), "alone_ttft_p90_s": quantile(base["ttft"], 0.9),
            "engine_share": engine_seconds / level["seconds"], "steps": steps,
            "tokens_per_step": level["tokens"] / steps, "in_process_tokens_per_step": inproc["tokens"] / inproc["steps"],
            "cpu_cores": cpu,
            "identical": sum(x == y for x, y in zip(level["texts"], base["texts"]))}


def median_round(rounds: list[dict]) -> dict:
    """The round of median server speedup, whole (its figures come from one round), with every
    round's speedups beside it and the fewest identical outputs of any round."""
    pick = sorted(rounds, key=lambda r: r["speedup"])[(len(rounds) - 1) // 2]
    return dict(pick, identical=min(r["identical"] for r in rounds),
                speedups=[r["speedup"] for r in rounds], in_process_speedups=[r["in_process_speedup"] for r in rounds])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads, the server's and the baseline's")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds per level (baseline, in process, server); the round of median speedup is reported")
    ap.add_argument("--small", action="store_true", help="smoke run: 8 requests, 1 and 4 clients, 32 tokens, 1 round")
    ap.add_argument("--out", default="results/serve")
    a = ap.parse_args(argv)
    if a.small:
        a.requests, a.clients, a.max_tokens, a.repeat = 8, [1, 4], 32, 1
    for name in ("requests", "max_tokens", "threads", "repeat"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if any(c < 1 for c in a.clients):
        ap.error(f"--clients must be >= 1, got {a.clients}")
    prompts = questions(a.requests)

    proc, url = start_server(a.model, max(a.clients), a.threads)
    cpu = CPUShares(proc.pid)
    rows = []
    try:
        with torch_threads(a.threads):
            model = AutoD2FModel.from_pretrained(a.model)
            alone(model, prompts[:2], a.max_tokens)  # warm-up
            env = environment()
            for clients in a.clients:
                rounds = []
                for _ in range(a.repeat):
                    # The baseline is measured right before the server (the server idle), so that
                    # both see the same machine load.
                    base = alone(model, prompts, a.max_tokens)
                    inproc = in_process(model, prompts, clients, a.max_tokens)
                    asyncio.run(serve_level(url, prompts[:2], 1, a.max_tokens))  # warm-up
                    before = health(url)
                    cpu.start()
                    level = asyncio.run(serve_level(url, prompts, clients, a.max_tokens))
                    shares = cpu.stop()
                    after = health(url)
                    rounds.append(row(clients, base, level, inproc, after["step_seconds"] - before["step_seconds"],
                                      after["steps"] - before["steps"], shares))
                rows.append(median_round(rounds))
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"{'clients':>7} {'tok/s':>8} {'alone':>8} {'speedup':>8} {'in proc':>8} {'TTFT med':>9} {'TTFT p90':>9} "
          f"{'alone TTFT':>10} {'engine':>7} {'tok/step':>13} {'cores: clients http engine':>27} {'identical':>10}")
    for r in rows:
        print(f"{r['clients']:7d} {r['tokens_per_s']:8.1f} {r['alone_tokens_per_s']:8.1f} {r['speedup']:7.2f}x "
              f"{r['in_process_speedup']:7.2f}x "
              f"{r['ttft_median_s'] * 1e3:7.0f}ms {r['ttft_p90_s'] * 1e3:7.0f}ms {r['alone_ttft_median_s'] * 1e3:8.0f}ms "
              f"{r['engine_share']:7.0%} {r['tokens_per_step']:6.1f}/{r['in_process_tokens_per_step']:<6.1f} "
              f"{r['cpu_cores']['clients']:13.2f} {r['cpu_cores']['http']:5.2f} {r['cpu_cores']['engine']:6.2f} "
              f"{r['identical']:>5}/{len(prompts)}")
    identical = all(r["identical"] == len(prompts) for r in rows)
    print(f"every greedy output identical to generate alone: {identical}")
    args = dict(vars(a), model=os.path.basename(os.path.normpath(a.model)))  # no machine paths in results
    payload = {"env": env, "args": args, "rows": rows, "all_identical": identical}
    write_json(os.path.join(a.out, "serve.json"), payload)
    write_markdown(os.path.join(a.out, "serve.md"),
                   ["clients", "tokens / s", "one at a time: tokens / s", "speedup", "speedup, each round",
                    "engine in process, no server: speedup", "TTFT median (ms)",
                    "TTFT p90 (ms)", "one at a time: TTFT median (ms)", "time in engine steps",
                    "tokens per step (in process)", "CPU cores: clients / HTTP / engine", "outputs identical"],
                   [[r["clients"], f"{r['tokens_per_s']:.1f}", f"{r['alone_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
                     " / ".join(f"{x:.2f}x" for x in r["speedups"]), f"{r['in_process_speedup']:.2f}x",
                     f"{r['ttft_median_s'] * 1e3:.0f}", f"{r['ttft_p90_s'] * 1e3:.0f}",
                     f"{r['alone_ttft_median_s'] * 1e3:.0f}", f"{r['engine_share']:.0%}",
                     f"{r['tokens_per_step']:.1f} ({r['in_process_tokens_per_step']:.1f})",
                     " / ".join(f"{r['cpu_cores'][k]:.2f}" for k in ("clients", "http", "engine")),
                     f"{r['identical']}/{len(prompts)}"]
                    for r in rows])
    plot(rows, os.path.join(a.out, "serve.png"))
    print(f"wrote {a.out}/serve.json, serve.md and serve.png")
    return payload


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(x, [r["tokens_per_s"] for r in rows], "o-", label="d2f-serve")
    axes[0].plot(x, [r["in_process_tokens_per_s"] for r in rows], "s:", label="engine in process (no server)")
    axes[0].plot(x, [r["alone_tokens_per_s"] for r in rows], "x--", color="gray", label="one at a time")
    axes[0].set_ylabel("generated tokens / s")
    axes[1].plot(x, [r["ttft_median_s"] * 1e3 for r in rows], "o-", label="median")
    axes[1].plot(x, [r["ttft_p90_s"] * 1e3 for r in rows], "s--", label="p90")
    axes[1].plot(x, [r["alone_ttft_median_s"] * 1e3 for r in rows], "x--", color="gray", label="one at a time (median)")
    axes[1].set_ylabel("time to first token (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
