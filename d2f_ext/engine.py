"""The D2F engine: one long-lived object per model that owns decoding.

It allocates once, for ``max_batch`` rows of ``max_len`` positions, the token buffer, the KV
cache, the block-pipeline state and (Dream) the carried logits, and keeps its CUDA graphs across
calls. Requests join a free row between two steps and leave when they finish (continuous
batching); rows with different prompts, lengths, thresholds, temperatures and seeds decode
together, each exactly as it would alone (sampled rows draw their noise from their own seed and
step count, as a batch of one does). Each step is one forward over the in-flight windows, the
output head (and the last layer's MLP) on the window positions whose logits are read, unmask,
and the block-state update (``d2f_ext.ops.pipeline_step``).

Two ways to drive the steps (the same tokens and forwards either way):

- compact (the CPU default): before every step the host reads the plan, leaves finished rows out
  of the batch (``cache_rows``), sizes the window to the widest one and runs the layers on the
  windows' real positions only (``packed``), so a row just admitted, whose first window covers
  its prompt, does not pad the others to its width: no work is wasted;
- static (the CUDA default): every row stays in the batch (a free or finished row's window is all
  padding) and the window width is fixed for ``sync_every`` steps, enough for the widest window
  those steps can plan (a window grows by at most one block a step). A step then has fixed
  shapes and reads nothing on the host, so with greedy decoding on CUDA each shape is captured
  once in a CUDA graph and replayed by every later step and request; the host reads the plan,
  admits requests and collects output once every ``sync_every`` steps.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Callable, Optional, Sequence

import torch

from . import layout as L
from . import ops
from .config import D2FConfig, is_int
from .decoding.common import DecodeOutput, check_prompts, first_of
from .models import KVCache
from .pipeline import init_rows, num_blocks_for, window_block_ids


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_batch: rows decoded together (more requests wait for a free row). max_len: positions
    per row, prompt + generation (capped by the model's context). block_size: every request's
    block size. static / sync_every / cuda_graphs: how steps are driven (module docstring;
    defaults: static and graphed on CUDA, compact on the CPU)."""

    max_batch: int = 8
    max_len: int = 2048
    block_size: int = 32
    static: Optional[bool] = None
    sync_every: int = 4
    cuda_graphs: Optional[bool] = None

    def __post_init__(self):
        for name in ("max_batch", "max_len", "block_size", "sync_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt being decoded. ``output`` grows as tokens become final (never changes once
    there): the generated tokens before the first EOS (``eos_id`` or one of ``stop_token_ids``),
    cut after the token that completes a stop string, and at ``max_tokens``. ``finish_reason``:
    "stop" (EOS or a stop string), "length" (max_new_tokens or max_tokens reached, or the row
    ended without an EOS), "abort" (cancelled); None while running."""

    prompt: list[int]
    cfg: D2FConfig
    eos_id: Optional[int]
    stop: tuple[str, ...] = ()
    max_tokens: Optional[int] = None  # at most this many output tokens (a server's max_tokens)
    # More ids that end the output as EOS does (transformers' list eos_token_id, vLLM's
    # stop_token_ids). The kernels pipeline on eos_id alone; the row ends once the output
    # reaches one of these.
    stop_token_ids: tuple[int, ...] = ()
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    output: list[int] = dataclasses.field(default_factory=list)
    generated: Optional[list[int]] = None  # the whole generation region once finished
    forwards: int = 0
    steps: int = 0
    finish_reason: Optional[str] = None
    stop_string: Optional[str] = None  # the stop string that ended it
    slot: int = -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def end_token(self) -> Optional[int]:
        """The decoded EOS (``eos_id`` or one of ``stop_token_ids``) the output ended at, which
        it does not include; None when it ended otherwise."""
        g, n = self.generated, len(self.output)
        if self.stop_string is None and g is not None and n < len(g) and g[n] in self.end_ids():
            return g[n]
        return None

    def end_ids(self) -> tuple[int, ...]:
        return self.stop_token_ids if self.eos_id is None else (self.eos_id, *self.stop_token_ids)


@dataclasses.dataclass
class StepOutput:
    """What a step made final for one request: its new output tokens; finished when it ended."""

    request: Request
    new_tokens: list[int]

    @property
    def finished(self) -> bool:
        return self.request.finished


class Engine:
    """Owns one model's decoding state; see the module docstring. Not thread-safe: one caller
    drives ``step()`` (the server runs it on one thread)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), tokenizer=None):
        mc = model.config
        self.model, self.config = model, config
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        on_cuda = self.device.type == "cuda"
        self.static = on_cuda if config.static is None else config.static
        self.cuda_graphs = self.static and on_cuda if config.cuda_graphs is None else config.cuda_graphs
        if self.cuda_graphs and not (self.static and on_cuda):
            raise ValueError("cuda_graphs needs static=True and a CUDA model")
        B, S = config.max_batch, min(config.max_len, mc.max_position_embeddings)
        self.max_len = S
        # One scratch column at S absorbs the writes of window padding.
        self.seq = torch.full((B, S + 1), mc.mask_token_id, dtype=torch.long, device=self.device)
        self.cache = KVCache.for_model(model, B, S)
        self.rows = torch.zeros(B, L.NUM_ROW_FIELDS, dtype=torch.int32, device=self.device)
        self.rows[:, L.FINISHED] = 1  # a free row: no window, nothing to decode
        self.blocks = torch.zeros(B, L.NUM_BLOCK_FIELDS, num_blocks_for(S, config.block_size),
                                  dtype=torch.int32, device=self.device)
        self.prev_logits = (torch.zeros(B, mc.vocab_size, dtype=p.dtype, device=self.device)
                            if mc.logit_shift else None)
        self.slots: list[Optional[Request]] = [None] * B
        self.waiting: collections.deque[Request] = collections.deque()
        self.graphs: dict = {}
        self._warm: set = set()
        self._pool = None
        self.graph_captures = 0

    # --- requests ---------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], cfg: D2FConfig, *, eos_id: Optional[int] = None,
                    stop: Sequence[str] = (), max_tokens: Optional[int] = None,
                    stop_token_ids: Sequence[int] = ()) -> Request:
        """Queue a prompt (real token ids) to decode with ``cfg``; it joins a row at the next
        step that finds one free. stop: strings that end the request once its text holds one
        (needs the engine's tokenizer). max_tokens: end it after that many output tokens, for a
        budget that is not a whole number of blocks (cfg's canvas must cover it).
        stop_token_ids: more token ids that end the output as ``eos_id`` does."""
        mc = self.model.config
        if not isinstance(cfg, D2FConfig):
            raise TypeError(f"cfg must be a D2FConfig, got {type(cfg).__name__}")
        if cfg.block_size != self.config.block_size:
            raise ValueError(f"block_size {cfg.block_size} differs from the engine's {self.config.block_size}")
        prompt = check_prompts([prompt], mc.mask_token_id, mc.vocab_size, self.max_len, cfg.max_new_tokens)[0]
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {stop!r}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model has none)")
        if max_tokens is not None and not (isinstance(max_tokens, int) and 1 <= max_tokens <= cfg.gen_len):
            raise ValueError(f"max_tokens must be an integer in [1, {cfg.gen_len}] (the canvas), got {max_tokens!r}")
        eos = mc.eos_token_id if eos_id is None else int(eos_id)
        if eos is not None and eos >= mc.vocab_size:
            raise ValueError(f"eos_id must be below the vocabulary size {mc.vocab_size} (negative: none), got {eos}")
        stop_ids = tuple(stop_token_ids)
        if any(not is_int(t) or not 0 <= t < mc.vocab_size or t == mc.mask_token_id for t in stop_ids):
            raise ValueError(f"stop_token_ids must be token ids below the vocabulary size {mc.vocab_size}, "
                             f"other than the mask token {mc.mask_token_id}, got {stop_token_ids!r}")
        request = Request(prompt, cfg, eos, stop, max_tokens, tuple(int(t) for t in stop_ids))
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Cancel a request: its row (if it has one) is free for the next step."""
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request.slot >= 0:
            request.forwards = int(self.rows[request.slot, L.FORWARDS])
            self._free(request)
        request.finish_reason = "abort"

    @property
    def num_active(self) -> int:
        """Requests holding a row."""
        return sum(r is not None for r in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_active > 0

    # --- decoding ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free rows, run one step (static: ``sync_every`` steps),
        and return what became final, per request that has news or ended. Inference only: the
        output head, like the layers, runs without autograd."""
        admitted = self._admit()
        active = [r for r in self.slots if r is not None]
        if not active:
            return []
        if self.static:
            self._static_steps(active, first=admitted)
        else:
            plan = self.rows[:, L.FINISHED].tolist()
            live = [r for r in active if not plan[r.slot]]
            if live:
                slots = torch.tensor([r.slot for r in live], device=self.device)
                W = int(self.rows[slots, L.WIN_LEN].max())
                local, n = {r.slot: i for i, r in enumerate(live)}, len(live)
                unmask_groups, pipeline_groups = self._groups(live)
                self._forward(slots, W, None, _localise(unmask_groups, local, n, self.device),
                              _localise(pipeline_groups, local, n, self.device), _samples(live))
                for r in live:
                    r.steps += 1
        return self._collect(active)

    def decode(self, prompts: Sequence[Sequence[int]], cfg: D2FConfig, *, eos_id: Optional[int] = None,
               stop: Sequence[str] = (), on_step: Optional[Callable[[list[StepOutput]], None]] = None,
               max_tokens: Optional[int] = None, stop_token_ids: Sequence[int] = ()
               ) -> tuple[DecodeOutput, list[Request]]:
        """Decode every prompt to its end (more prompts than rows take turns); on_step gets each
        step's outputs, for streaming; max_tokens and stop_token_ids as in :meth:`add_request`."""
        requests = []
        try:
            for p in prompts:
                requests.append(self.add_request(p, cfg, eos_id=eos_id, stop=stop, max_tokens=max_tokens,
                                                 stop_token_ids=stop_token_ids))
            while not all(r.finished for r in requests):
                outputs = self.step()
                if on_step is not None:
                    on_step(outputs)
        except BaseException:  # a failed or interrupted call leaves no request behind to decode
            for r in requests:
                self.abort(r)
            raise
        mask = self.model.config.mask_token_id
        generated = torch.full((len(requests), cfg.gen_len), mask, dtype=torch.long)
        for i, r in enumerate(requests):
            generated[i, : len(r.generated)] = torch.tensor(r.generated, dtype=torch.long)
        forwards = torch.tensor([r.forwards for r in requests], dtype=torch.long)
        return DecodeOutput(generated, forwards), requests

    # --- internals --------------------------------------------------------------------------

    def _admit(self) -> bool:
        admitted = False
        for slot in range(len(self.slots)):
            if not self.waiting:
                break
            if self.slots[slot] is not None:
                continue
            r = self.waiting.popleft()
            n, cfg = len(r.prompt), r.cfg
            self.seq[slot].fill_(self.model.config.mask_token_id)
            self.seq[slot, :n] = torch.tensor(r.prompt, device=self.device)
            lens = torch.tensor([n], dtype=torch.int32, device=self.device)
            gen = torch.tensor([cfg.gen_len], dtype=torch.int32, device=self.device)
            init_rows(self.rows[slot:slot + 1], self.blocks[slot:slot + 1], lens, gen, cfg.block_size,
                      cfg.block_add_threshold, cfg.decoded_token_threshold)
            if self.prev_logits is not None:
                self.prev_logits[slot].zero_()
            r.slot, self.slots[slot] = slot, r
            admitted = True
        return admitted

    def _free(self, r: Request) -> None:
        # A static step still runs a freed row (its window empty): with nothing to commit either,
        # it writes no cache and reads no carried logit.
        self.rows[r.slot, L.FINISHED] = 1
        self.rows[r.slot, L.WIN_LEN] = 0
        self.rows[r.slot, L.COMMIT_LEN] = 0
        self.slots[r.slot] = None
        r.slot = -1

    @staticmethod
    def _groups(active: list[Request]):
        """Rows that one unmask call, and one pipeline_step call, can serve together: the same
        settings (a sampled row alone, so that its noise is that of a batch of one)."""
        unmask, pipeline = {}, {}
        for r in active:
            c = r.cfg
            key = _unmask_settings(r) + ((r.id,) if c.temperature > 0 else ())
            unmask.setdefault(key, []).append(r)
            pipeline.setdefault(_pipeline_settings(r), []).append(r)
        return list(unmask.values()), list(pipeline.values())

    def _static_steps(self, active: list[Request], first: bool) -> None:
        bs = self.config.block_size
        # A just-admitted row's first window holds its prompt: run that step on its own.
        interval = 1 if first else self.config.sync_every
        plan = self.rows[:, [L.FINISHED, L.WIN_LEN, L.COMMIT_LEN]].cpu()  # the interval's one host sync
        if bool(plan[:, 0].all()):
            return
        live = [r for r in active if not plan[r.slot, 0]]
        grow = (interval - 1) * bs

        def width(n: int) -> int:  # whole blocks: fewer distinct shapes, so fewer graphs
            return min(-(-(n + grow) // bs) * bs if interval > 1 else n, self.max_len)

        W = width(int(plan[:, 1].max()))
        sampled = _samples(live)
        reads = W if sampled else min(max(width(int((plan[:, 1] - plan[:, 2]).max())), 1), W)
        slots, B = {r.slot: r.slot for r in live}, len(self.slots)
        unmask_groups, pipeline_groups = self._groups(live)
        ug = _localise(unmask_groups, slots, B, self.device)
        pg = _localise(pipeline_groups, slots, B, self.device)
        for _ in range(interval):
            if self.cuda_graphs and not sampled:
                self._graphed(W, reads, ug, pg)
            else:
                self._forward(None, W, reads, ug, pg, sampled)
            for r in live:
                r.steps += 1

    def _graphed(self, W: int, reads: int, ug, pg) -> None:
        """The static step of these shapes and groups: eager once (which also makes the ops'
        host-side value checks), then captured once, then replayed by every later step."""
        def shape(groups):
            return tuple((None if i is None else tuple(i.tolist()), _unmask_settings(g[0]) if g else None)
                         for i, g in groups)

        key = (W, reads, shape(ug), tuple(None if i is None else tuple(i.tolist()) for i, _ in pg),
               tuple(_pipeline_settings(g[0]) for _, g in pg))
        graph = self.graphs.get(key, (None,))[0]
        if graph is None and key not in self._warm:
            self._forward(None, W, reads, ug, pg)
            self._warm.add(key)
            return
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(None, W, reads, ug, pg)  # recorded, not run
            self._pool = graph.pool()
            # The graph reads the group indices at their captured addresses: they live with it.
            self.graphs[key] = (graph, ug, pg)
            self.graph_captures += 1
        graph.replay()

    def _forward(self, live: Optional[torch.Tensor], W: int, reads: Optional[int], unmask_groups,
                 pipeline_groups, sampled: bool = False) -> None:
        """One forward over windows of width W (>= every planned WIN_LEN) of the rows ``live``
        (compact) or of every row (static), the output head on ``reads`` (>= any row's masked
        positions; None: counted here, a host sync) positions of each row, unmask, and the
        state update. Groups: (row indices within the step's batch, requests). ``sampled``:
        whether any row samples."""
        mc, S = self.model.config, self.max_len
        rows = self.rows if live is None else self.rows[live]
        blocks = self.blocks if live is None else self.blocks[live]
        seq = self.seq if live is None else self.seq[live]
        win_start = rows[:, L.WIN_START].contiguous()
        commit = rows[:, L.COMMIT_LEN].contiguous()
        block_ids = window_block_ids(rows, blocks, W)
        pos = win_start[:, None] + torch.arange(W, device=self.device, dtype=torch.int32)
        tokens = seq.gather(1, torch.where(block_ids >= 0, pos, S).long())
        packed = None
        if live is not None and live.numel() > 1:
            # Rows' windows differ in width (a just-admitted row's covers its prompt): the layers
            # skip the padding. Compact steps read the plan on the host anyway; one more read is cheap.
            packed = (block_ids >= 0).view(-1).nonzero().squeeze(1)
            packed = None if packed.numel() == block_ids.numel() else packed
        # The head runs on the masked positions only (in position order, so unmask's ties and
        # forced picks are unchanged), plus for Dream the committed span's last position, whose
        # logits predict the next window's first. The last layer's MLP runs on those positions
        # only. A sampled row's noise is keyed by window position, so a batch with one reads
        # whole windows, gathered after the forward (which then skips the padding).
        ar = torch.arange(W, device=self.device)
        if sampled:
            reads = W
            read = ar.expand(rows.shape[0], W)
            inside = block_ids >= 0
        else:
            masked = (tokens == mc.mask_token_id) & (block_ids >= 0)
            n = masked.sum(1)
            if reads is None:  # compact steps may size it on the host
                reads = max(int(n.max()), 1)
            read = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :reads]
            inside = ar[:reads] < n[:, None]
        shift = 1 if mc.logit_shift else 0
        src = (read - shift).clamp(min=0)
        if shift:
            src = torch.cat([src, (commit.long() - 1).clamp(min=0)[:, None]], 1)
        hidden = self.model.window_hidden(tokens, pos.long(), block_ids, self.cache, win_start, commit,
                                          cache_rows=None if live is None else live.to(torch.int32),
                                          packed=packed, outputs=None if sampled else src)
        if sampled:
            hidden = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.model.head(hidden)
        if shift:
            prev = self.prev_logits if live is None else self.prev_logits[live]
            carried = torch.where((commit > 0)[:, None], logits[:, reads], prev.to(logits.dtype))
            logits = logits[:, :reads]
            # Window position 0 (first in the read order when it is read) predicts from the last
            # cached position, saved by the forward that cached it.
            logits[:, 0] = torch.where((read[:, 0] == 0)[:, None], prev.to(logits.dtype), logits[:, 0])
        read_tokens = tokens.gather(1, read)
        read_ids = block_ids.gather(1, read).masked_fill(~inside, -1)
        fully_activated = blocks[:, L.FULLY_ACTIVATED]
        NB = blocks.shape[2]
        if len(unmask_groups) == 1 and unmask_groups[0][0] is None:
            counts, eos_block = self._unmask(logits, read_tokens, read_ids, fully_activated, unmask_groups[0][1][0])
        else:
            counts = torch.zeros(rows.shape[0], NB, dtype=torch.int32, device=self.device)
            eos_block = torch.full((rows.shape[0],), -1, dtype=torch.int32, device=self.device)
            for idx, group in unmask_groups:
                t = read_tokens[idx]
                c, e = self._unmask(logits[idx], t, read_ids[idx], fully_activated[idx], group[0])
                read_tokens[idx], counts[idx], eos_block[idx] = t, c, e
        cols = torch.where(inside, win_start[:, None].long() + read, S)
        seq.scatter_(1, cols, read_tokens)
        if live is not None:
            self.seq[live] = seq
        if shift:
            if live is None:
                self.prev_logits.copy_(carried)
            else:
                self.prev_logits[live] = carried.to(self.prev_logits.dtype)
        bs = self.config.block_size
        for idx, group in pipeline_groups:
            add, act = _pipeline_settings(group[0])
            if live is None and idx is None:
                ops.pipeline_step(self.rows, self.blocks, counts, eos_block, bs, add, act)
                continue
            at_rows = live if idx is None else (idx if live is None else live[idx])
            r, b = self.rows[at_rows], self.blocks[at_rows]
            ops.pipeline_step(r, b, counts if idx is None else counts[idx],
                              eos_block if idx is None else eos_block[idx], bs, add, act)
            self.rows[at_rows], self.blocks[at_rows] = r, b

    def _unmask(self, logits, tokens, block_ids, fully_activated, r: Request):
        c = r.cfg
        # A sampled row draws its noise from its own seed and step count, as a batch of one does.
        return ops.unmask(logits, tokens, block_ids, fully_activated, self.model.config.mask_token_id,
                          eos_id=-1 if r.eos_id is None else r.eos_id, skip_threshold=c.skip_threshold,
                          temperature=c.temperature, sampling_strategy=c.sampling_strategy,
                          seed=c.seed + r.steps, top_k=c.top_k, top_p=c.top_p)

    def _collect(self, active: list[Request]) -> list[StepOutput]:
        """Read back each active request's generation, pass on what became final, and free the
        rows of requests that ended (EOS decoded and every block up to it final, a stop string,
        or the budget used up)."""
        mask = self.model.config.mask_token_id
        slots = torch.tensor([r.slot for r in active], device=self.device)
        seq = self.seq[slots].cpu()
        state = self.rows[slots][:, [L.FINISHED, L.FORWARDS]].cpu()
        outputs = []
        for r, row, (finished, forwards) in zip(active, seq.tolist(), state.tolist()):
            n = len(r.prompt)
            gen = row[n: n + r.cfg.gen_len]
            final = gen.index(mask) if mask in gen else len(gen)
            # Only the tokens made final since the last step are read: that span is short.
            eos_at = first_of(gen, r.end_ids(), len(r.output), final)
            new = gen[len(r.output): eos_at if eos_at >= 0 else final]
            stopped = None
            if r.stop and new:
                hit = first_stop(r.output + new, r.stop, self.tokenizer, start=len(r.output))
                if hit is not None:
                    stopped, r.stop_string = new[: hit[0] - len(r.output)], hit[1]
                    new = stopped
            capped = r.max_tokens is not None and len(r.output) + len(new) >= r.max_tokens
            if capped:
                new = new[: r.max_tokens - len(r.output)]
            r.output.extend(new)
            r.forwards = forwards
            # The kernels end a row at eos_id; at another end token the output is complete too.
            at_stop_token = eos_at >= 0 and gen[eos_at] != r.eos_id and len(r.output) == eos_at
            if stopped is not None or finished or capped or at_stop_token:
                r.generated = gen
                # An EOS ends it ("stop") only when the output reached it, not when cut before.
                reached_eos = eos_at >= 0 and len(r.output) == eos_at
                r.finish_reason = "stop" if stopped is not None or reached_eos else "length"
                self._free(r)
            if new or r.finished:
                outputs.append(StepOutput(r, new))
        return outputs


def engine_for(model, block_size: int, batch: int, length: int, **options) -> Engine:
    """The model's engine, built anew only when this call needs a different block size or
    step driving, or more rows or positions than it has, or the model moved or changed dtype
    since (its cache and buffers would not match the weights)."""
    e = getattr(model, "d2f_engine", None)
    p = next(model.parameters())
    if e is not None and (e.device != p.device or e.dtype != p.dtype):
        e = None
    want = EngineConfig(max_batch=batch, max_len=length, block_size=block_size, **options)
    if e is not None and e.config.block_size == block_size and e.config.max_batch >= batch and \
            e.max_len >= length and all(getattr(e.config, k) == v for k, v in options.items()):
        return e
    if e is not None and e.config.block_size == block_size:  # grow, keeping what it had
        want = dataclasses.replace(want, max_batch=max(batch, e.config.max_batch), max_len=max(length, e.max_len))
    model.d2f_engine = Engine(model, want)
    return model.d2f_engine


def first_stop(tokens: list[int], stop: Sequence[str], tokenizer, start: int = 0):
    """(n, the stop string) for the shortest prefix ``tokens[:n]``, n > start, whose text holds a
    stop string, or None. A prefix's text only grows with n, hence the bisection."""
    def found(n):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return next((s for s in stop if s in text), None)

    if found(len(tokens)) is None:
        return None
    lo, hi = start + 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if found(mid) is not None else (mid + 1, hi)
    return lo, found(lo)


def _localise(groups: list[list[Request]], index: dict[int, int], batch: int, device):
    """Groups as (row indices in the step's batch of ``batch`` rows, or None for all of them,
    which spares the gathers; the group's requests)."""
    out = []
    for g in groups:
        idx = None if len(g) == batch else torch.tensor([index[r.slot] for r in g], device=device)
        out.append((idx, g))
    return out


def canvas_for(max_tokens: int, block_size: int) -> int:
    """The max_new_tokens that decodes at least ``max_tokens`` tokens: the whole blocks that
    cover it, or one shorter block (a request's ``max_tokens`` then ends it at the bound)."""
    return max_tokens if max_tokens <= block_size else -(-max_tokens // block_size) * block_size


def _samples(requests: list[Request]) -> bool:
    return any(r.cfg.temperature > 0 for r in requests)


def _unmask_settings(r: Request) -> tuple:
    c = r.cfg
    return (c.skip_threshold, c.temperature, c.sampling_strategy, c.top_k, c.top_p, r.eos_id)


def _pipeline_settings(r: Request) -> tuple:
    return (r.cfg.block_add_threshold, r.cfg.decoded_token_threshold)
