"""pipeline_step and BlockPipeline against the spec's block-state machine, with a generation
budget of any length (the last block shorter when it does not divide)."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2f_ext import layout as L
from d2f_ext import ops, reference
from d2f_ext.pipeline import BlockPipeline, init_rows, num_blocks_for, window_block_ids

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")

STATES = {"active": L.ACTIVE, "to_cache": L.TO_CACHE, "in_cache": L.IN_CACHE}


class SpecRow:
    """One row of the spec's state machine, written from the spec text alone (steps 1-4, 6, 7)."""

    def __init__(self, prompt_len, max_new_tokens, block_size, tau_add, tau_act):
        self.blocks = [dict(start=0, len=prompt_len, masked=0, state="to_cache", fully_activated=True)]
        self.end = prompt_len + max_new_tokens
        self.block_size, self.tau_add, self.tau_act = block_size, tau_add, tau_act
        self.eos = None
        self.cache_end = 0
        self.finished = False
        self.forwards = 0
        self.window = (0, 0, 0)  # start, length, committed length of the planned forward

    @staticmethod
    def fraction(b):
        return (b["len"] - b["masked"]) / b["len"]

    def plan(self):
        """Steps 1-4: returns False when the row is done."""
        newest = self.blocks[-1]
        start = newest["start"] + newest["len"]
        if start < self.end and self.eos is None and self.fraction(newest) >= self.tau_add:
            size = min(self.block_size, self.end - start)
            self.blocks.append(dict(start=start, len=size, masked=size, state="active", fully_activated=False))
        for i in range(len(self.blocks) - 1):
            if self.fraction(self.blocks[i]) >= self.tau_act:
                self.blocks[i + 1]["fully_activated"] = True
        no_mask = all(b["masked"] == 0 for b in self.blocks)
        no_active = all(b["state"] != "active" for b in self.blocks)
        eos_done = self.eos is not None and all(b["masked"] == 0 for b in self.blocks[: self.eos + 1])
        if (no_mask and no_active) or eos_done:
            self.finished = True
            self.window = (self.window[0], 0, 0)
            return False
        to_cache = [b for b in self.blocks if b["state"] == "to_cache"]
        if to_cache:
            start = to_cache[0]["start"]
        else:
            start = next(b["start"] for b in self.blocks if b["state"] == "active" and b["start"] >= self.cache_end)
        assert start == self.cache_end, "the spec's window start should always be the cache end"
        for b in to_cache:
            b["state"] = "in_cache"
        commit = sum(b["len"] for b in to_cache)
        self.cache_end += commit
        end = self.blocks[-1]["start"] + self.blocks[-1]["len"]
        self.window = (start, end - start, commit)
        self.forwards += 1
        return True

    def observe(self, counts, eos_block):
        """Step 6's bookkeeping and step 7, after the forward."""
        if self.finished:
            return
        for b, c in zip(self.blocks, counts):
            b["masked"] -= c
        if eos_block >= 0 and (self.eos is None or eos_block < self.eos):
            self.eos = eos_block
        for i, b in enumerate(self.blocks):
            if b["state"] == "active" and b["masked"] == 0 and all(e["state"] != "active" for e in self.blocks[:i]):
                b["state"] = "to_cache"

    def assert_matches(self, row, blocks):
        n = len(self.blocks)
        assert int(row[L.NUM_BLOCKS]) == n
        assert int(row[L.EOS_BLOCK]) == (-1 if self.eos is None else self.eos)
        assert int(row[L.FINISHED]) == int(self.finished)
        assert int(row[L.CACHE_LEN]) == self.cache_end
        assert int(row[L.FORWARDS]) == self.forwards
        if self.finished:
            assert int(row[L.WIN_LEN]) == 0 and int(row[L.COMMIT_LEN]) == 0
        else:
            assert tuple(int(row[f]) for f in (L.WIN_START, L.WIN_LEN, L.COMMIT_LEN)) == self.window
        want = [[b["start"], b["len"], b["masked"], STATES[b["state"]], int(b["fully_activated"])] for b in self.blocks]
        assert blocks[:, :n].T.tolist() == want


def draw_counts(rng, rows, blocks, eos_rate):
    """A legal unmask result for the planned forward: the spec's step 6 in counts. A fully
    activated block in the window decodes at least one token, a semi-activated one maybe none;
    EOS lands in a block that decoded something."""
    B, _, NB = blocks.shape
    counts = torch.zeros(B, NB, dtype=torch.int32)
    eos = torch.full((B,), -1, dtype=torch.int32)
    for b in range(B):
        r, blk = rows[b], blocks[b]
        if r[L.FINISHED]:
            continue
        for i in range(int(r[L.NUM_BLOCKS])):
            m = int(blk[L.MASKED, i])
            if blk[L.STATE, i] != L.ACTIVE or m == 0:
                continue
            lo = 1 if blk[L.FULLY_ACTIVATED, i] else 0
            counts[b, i] = rng.randint(lo, m) if rng.random() < 0.5 else rng.randint(lo, min(m, lo + 1))
            if counts[b, i] and eos[b] < 0 and rng.random() < eos_rate:
                eos[b] = i
    return counts, eos


def check_step_properties(before, after, blocks_before, blocks_after, counts):
    """The spec's invariants of one pipeline_step on one row."""
    NB = blocks_after.shape[1]
    if before[L.FINISHED]:
        assert after.tolist() == before.tolist() and blocks_after.tolist() == blocks_before.tolist()
        return
    n0, n = int(before[L.NUM_BLOCKS]), int(after[L.NUM_BLOCKS])
    assert n0 <= n <= min(n0 + 1, NB)  # at most one block per step, never beyond the maximum
    if before[L.EOS_BLOCK] >= 0 or after[L.EOS_BLOCK] >= 0:
        assert n == n0  # an EOS stops adding
    masked = blocks_after[L.MASKED, :n]
    states = blocks_after[L.STATE, :n].tolist()
    # Cached blocks form a prefix and end exactly at the cache length.
    cached = states.count(L.IN_CACHE)
    assert states[:cached] == [L.IN_CACHE] * cached
    cache_len = int(after[L.CACHE_LEN])
    assert cache_len == int(blocks_after[L.START, cached - 1] + blocks_after[L.LEN, cached - 1])
    if after[L.FINISHED]:
        eos = int(after[L.EOS_BLOCK])
        if eos < 0:
            assert int(masked.sum()) == 0 and L.ACTIVE not in states and n == NB
        else:
            assert int(masked[: eos + 1].sum()) == 0
        return
    # A block enters the cache in the forward right after it became to_cache, i.e. as soon as it
    # and every block before it are decoded.
    newly = [i for i in range(n0) if blocks_before[L.STATE, i] != L.IN_CACHE and states[i] == L.IN_CACHE]
    expect = []
    for i in range(n0):
        if blocks_before[L.STATE, i] == L.IN_CACHE:
            continue
        if int(blocks_before[L.MASKED, i] - counts[i]) != 0:
            break
        expect.append(i)
    assert newly == expect and L.TO_CACHE not in states
    assert int(after[L.COMMIT_LEN]) == sum(int(blocks_after[L.LEN, i]) for i in newly)
    # The window starts at the cache end it reads and runs to the end of the last block.
    start = int(after[L.WIN_START])
    assert start == int(before[L.CACHE_LEN]) == cache_len - int(after[L.COMMIT_LEN])
    assert start + int(after[L.WIN_LEN]) == int(blocks_after[L.START, n - 1] + blocks_after[L.LEN, n - 1])
    # Forced progress: the earliest block with masks is fully activated and inside the window.
    first = next(i for i in range(n) if masked[i] > 0)
    assert blocks_after[L.FULLY_ACTIVATED, first] == 1 and int(blocks_after[L.START, first]) >= start


def drive(device, prompt_lens, max_new_tokens, block_size, tau_add, tau_act, seed, eos_rate,
          with_reference=True):
    """Runs the op, the reference and the spec model side by side until every row finishes."""
    rng = random.Random(seed)
    pipe = BlockPipeline(torch.tensor(prompt_lens, dtype=torch.int32, device=device), max_new_tokens,
                         block_size, tau_add, tau_act)
    NB = pipe.num_blocks_max
    assert NB == 1 + -(-max_new_tokens // block_size)
    models = [SpecRow(p, max_new_tokens, block_size, tau_add, tau_act) for p in prompt_lens]
    ref_rows = torch.zeros(len(prompt_lens), L.NUM_ROW_FIELDS, dtype=torch.int32)
    ref_rows[:, L.NUM_BLOCKS], ref_rows[:, L.EOS_BLOCK] = 1, -1
    ref_rows[:, L.PROMPT_LEN] = torch.tensor(prompt_lens)
    ref_rows[:, L.GEN_LEN] = max_new_tokens
    ref_blocks = torch.zeros(len(prompt_lens), L.NUM_BLOCK_FIELDS, NB, dtype=torch.int32)
    ref_blocks[:, L.LEN, 0] = torch.tensor(prompt_lens)
    ref_blocks[:, L.STATE, 0], ref_blocks[:, L.FULLY_ACTIVATED, 0] = L.TO_CACHE, 1
    counts = torch.zeros(len(prompt_lens), NB, dtype=torch.int32)
    eos = torch.full((len(prompt_lens),), -1, dtype=torch.int32)
    reference.pipeline_step(ref_rows, ref_blocks, counts, eos, block_size, tau_add, tau_act)
    for m in models:
        m.plan()
    budget = max_new_tokens + 2  # every forward decodes a token
    for _ in range(budget):
        rows, blocks = pipe.rows.cpu().clone(), pipe.blocks.cpu().clone()
        for b, m in enumerate(models):
            m.assert_matches(rows[b], blocks[b])
        if with_reference:
            assert torch.equal(rows, ref_rows) and torch.equal(blocks, ref_blocks)
        if pipe.finished():
            return rows, blocks
        counts, eos = draw_counts(rng, rows, blocks, eos_rate)
        # Junk for finished rows: a step after a row finished must change nothing.
        done = rows[:, L.FINISHED].bool()
        counts[done] = 1
        eos[done] = 0
        pipe.step(counts.to(device), eos.to(device))
        if with_reference:
            reference.pipeline_step(ref_rows, ref_blocks, counts, eos, block_size, tau_add, tau_act)
        after_rows, after_blocks = pipe.rows.cpu(), pipe.blocks.cpu()
        for b, m in enumerate(models):
            m.observe(counts[b].tolist(), int(eos[b]))
            if not m.finished:
                m.plan()
            check_step_properties(rows[b], after_rows[b], blocks[b], after_blocks[b], counts[b])
    raise AssertionError("pipeline did not terminate within the decode budget")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("taus", [(0.1, 0.95), (0.7, 0.95), (0.9, 0.95), (0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_against_spec_and_reference(device, seed, taus):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    lens = [rng.randint(1, 12) for _ in range(rng.randint(1, 4))]
    drive(device, lens, block_size * rng.randint(1, 5) + rng.randint(0, block_size - 1), block_size,
          *taus, seed, eos_rate=0.1 if seed % 2 else 0.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lens=st.lists(st.integers(1, 20), min_size=1, max_size=4), block_size=st.integers(1, 8),
       gen_blocks=st.integers(1, 6), extra=st.integers(0, 7),
       tau_add=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]) | st.floats(0, 1),
       tau_act=st.sampled_from([0.0, 0.5, 0.95, 1.0]) | st.floats(0, 1),
       seed=st.integers(0, 2**31), eos_rate=st.sampled_from([0.0, 0.05, 0.3]))
def test_properties(device, lens, block_size, gen_blocks, extra, tau_add, tau_act, seed, eos_rate):
    max_new = gen_blocks * block_size + extra % block_size
    rows, _ = drive(device, lens, max_new, block_size, tau_add, tau_act, seed, eos_rate,
                    with_reference=False)
    assert rows[:, L.FINISHED].all()


def test_first_window_is_prompt_plus_block_one(device):
    pipe = BlockPipeline(torch.tensor([5, 3], dtype=torch.int32, device=device), 16, 4, 0.1, 0.95)
    rows, blocks = pipe.rows.cpu(), pipe.blocks.cpu()
    assert pipe.num_blocks_max == 5
    assert rows[:, L.WIN_START].tolist() == [0, 0]
    assert rows[:, L.WIN_LEN].tolist() == [9, 7]
    assert rows[:, L.COMMIT_LEN].tolist() == [5, 3] == rows[:, L.CACHE_LEN].tolist()
    assert blocks[:, L.STATE, :2].tolist() == [[L.IN_CACHE, L.ACTIVE]] * 2
    assert blocks[:, L.FULLY_ACTIVATED, 1].tolist() == [1, 1]
    ids = window_block_ids(pipe.rows, pipe.blocks, 10).cpu()
    assert ids.tolist() == [[0] * 5 + [1] * 4 + [-1], [0] * 3 + [1] * 4 + [-1] * 3]


def test_window_block_ids_after_commit(device):
    pipe = BlockPipeline(torch.tensor([3], dtype=torch.int32, device=device), 12, 2, 0.5, 0.5)
    counts = torch.tensor([[0, 1, 0, 0, 0, 0, 0]], dtype=torch.int32, device=device)
    eos = torch.tensor([-1], dtype=torch.int32, device=device)
    pipe.step(counts, eos)  # block 1 half decoded: block 2 added and fully activated
    pipe.step(torch.tensor([[0, 1, 2, 0, 0, 0, 0]], dtype=torch.int32, device=device), eos)
    rows = pipe.rows.cpu()
    # Blocks 1 and 2 decoded: committed in this forward, which also adds block 3.
    assert rows[0, [L.WIN_START, L.WIN_LEN, L.COMMIT_LEN, L.CACHE_LEN]].tolist() == [3, 6, 4, 7]
    assert window_block_ids(pipe.rows, pipe.blocks, 7).cpu().tolist() == [[1, 1, 2, 2, 3, 3, -1]]


def test_python_fallback_matches(monkeypatch, device):
    lens = torch.tensor([4, 1, 7], dtype=torch.int32, device=device)
    fast = BlockPipeline(lens, 24, 4, 0.3, 0.9)
    monkeypatch.setattr(ops, "HAVE_C", False)
    slow = BlockPipeline(lens, 24, 4, 0.3, 0.9)
    rng = random.Random(3)
    while not fast.finished():
        assert torch.equal(fast.rows, slow.rows) and torch.equal(fast.blocks, slow.blocks)
        counts, eos = draw_counts(rng, fast.rows.cpu(), fast.blocks.cpu(), 0.1)
        fast.step(counts.to(device), eos.to(device))
        slow.step(counts.to(device), eos.to(device))
    assert slow.finished() and torch.equal(fast.rows, slow.rows)


def test_fraction_compared_in_double():
    # 1 of 3 decoded is 0.333... in double; a float32 threshold rounding would flip this.
    thr = 1.0 / 3.0
    for run in (ops.pipeline_step, reference.pipeline_step):
        rows = torch.tensor([[2, -1, 0, 1, 1, 3, 0, 1, 1, 6]], dtype=torch.int32)
        blocks = torch.zeros(1, 5, 3, dtype=torch.int32)
        blocks[0, :, 0] = torch.tensor([0, 1, 0, L.IN_CACHE, 1])
        blocks[0, :, 1] = torch.tensor([1, 3, 3, L.ACTIVE, 1])
        run(rows, blocks, torch.tensor([[0, 1, 0]], dtype=torch.int32),
            torch.tensor([-1], dtype=torch.int32), 3, thr, thr)
        assert int(rows[0, L.NUM_BLOCKS]) == 3 and int(blocks[0, L.FULLY_ACTIVATED, 2]) == 1


def _args(device, B=2, NB=3):
    pipe = BlockPipeline(torch.full((B,), 4, dtype=torch.int32, device=device), (NB - 1) * 2, 2, 0.1, 0.9)
    return [pipe.rows.clone(), pipe.blocks.clone(), torch.zeros(B, NB, dtype=torch.int32, device=device),
            torch.full((B,), -1, dtype=torch.int32, device=device), 2, 0.1, 0.9]


@pytest.mark.parametrize("index,bad,match", [
    (0, lambda a: a[0].long(), "rows must be int32"),
    (0, lambda a: a[0][:, :8].contiguous(), r"rows must be \[B, 10\]"),
    (0, lambda a: a[0][None], "rows must be 2-D"),
    (0, lambda a: a[0].T.contiguous().T, "rows must be contiguous"),
    (1, lambda a: a[1].float(), "blocks must be int32"),
    (1, lambda a: a[1][:, :4].contiguous(), "blocks must be"),
    (1, lambda a: a[1][:1].contiguous(), "blocks must be"),
    (1, lambda a: a[1][0], "blocks must be 3-D"),
    (1, lambda a: a[1].transpose(0, 1).contiguous().transpose(0, 1), "blocks must be contiguous"),
    (2, lambda a: a[2][:, :2].contiguous(), "counts must be"),
    (2, lambda a: a[2].long(), "counts must be int32"),
    (2, lambda a: a[2][0], "counts must be 2-D"),
    (3, lambda a: a[3][:1].contiguous(), "eos_block must be"),
    (3, lambda a: a[3].long(), "eos_block must be int32"),
    (3, lambda a: a[3][None], "eos_block must be 1-D"),
    (4, lambda a: 0, "block_size must be > 0"),
    (5, lambda a: 1.5, "block_add_threshold must be in"),
    (5, lambda a: -0.1, "block_add_threshold must be in"),
    (6, lambda a: 1.01, "decoded_token_threshold must be in"),
    (6, lambda a: float("nan"), "decoded_token_threshold must be in"),
])
def test_bad_inputs(device, index, bad, match):
    args = _args(device)
    args[index] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.d2f_ext.pipeline_step(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("index", [1, 2, 3])
def test_bad_device(index):
    # Needs two real backends: a meta tensor would route the call to the fake kernel instead.
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = _args("cuda")
    args[index] = args[index].cpu()
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.d2f_ext.pipeline_step(*args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_lens=torch.tensor([3, 0], dtype=torch.int32)), "prompt_lens must all be >= 1"),
    (dict(prompt_lens=torch.tensor([3, 2])), "prompt_lens must be int32"),
    (dict(prompt_lens=torch.tensor([[3]], dtype=torch.int32)), "prompt_lens must be int32"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(block_add_threshold=1.2), "block_add_threshold must be in"),
    (dict(decoded_token_threshold=-0.5), "decoded_token_threshold must be in"),
])
def test_bad_pipeline(kwargs, match):
    args = dict(prompt_lens=torch.tensor([3, 2], dtype=torch.int32), max_new_tokens=8, block_size=4,
                block_add_threshold=0.1, decoded_token_threshold=0.9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BlockPipeline(**args)


def test_partial_last_block_and_per_row_budgets(device):
    """Rows of one batch with budgets of 5 and 11 at block size 4: blocks 4+1 and 4+4+3."""
    rows = torch.empty(2, L.NUM_ROW_FIELDS, dtype=torch.int32, device=device)
    blocks = torch.empty(2, L.NUM_BLOCK_FIELDS, num_blocks_for(11, 4), dtype=torch.int32, device=device)
    init_rows(rows, blocks, torch.tensor([2, 3], dtype=torch.int32, device=device),
              torch.tensor([5, 11], dtype=torch.int32, device=device), 4, 0.0, 0.0)
    eos = torch.full((2,), -1, dtype=torch.int32, device=device)
    while not bool(rows[:, L.FINISHED].all()):  # decode one token per active block each step
        counts = (blocks[:, L.MASKED] > 0).to(torch.int32) * (blocks[:, L.STATE] == L.ACTIVE).to(torch.int32)
        ops.pipeline_step(rows, blocks, counts, eos, 4, 0.0, 0.0)
    b = blocks.cpu()
    assert b[0, L.LEN, :3].tolist() == [2, 4, 1] and int(rows[0, L.NUM_BLOCKS]) == 3
    assert b[1, L.LEN, :4].tolist() == [3, 4, 4, 3] and int(rows[1, L.NUM_BLOCKS]) == 4
    assert (b[:, L.MASKED] == 0).all()


def test_init_rows_refuses_budget_past_blocks():
    rows = torch.empty(1, L.NUM_ROW_FIELDS, dtype=torch.int32)
    blocks = torch.empty(1, L.NUM_BLOCK_FIELDS, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs 3"):
        init_rows(rows, blocks, torch.tensor([2], dtype=torch.int32), torch.tensor([9], dtype=torch.int32),
                  4, 0.1, 0.9)


def test_empty_batch(device):
    pipe = BlockPipeline(torch.zeros(0, dtype=torch.int32, device=device), 8, 4, 0.1, 0.9)
    assert pipe.rows.shape == (0, L.NUM_ROW_FIELDS) and pipe.finished()


def test_opcheck(device):
    args = _args(device)
    args[2][:, 1] = torch.tensor([1, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.d2f_ext.pipeline_step, tuple(args))



@pytest.mark.parametrize("corrupt, match", [
    (lambda rows, blocks, counts: rows.__setitem__((0, L.NUM_BLOCKS), 0), "NUM_BLOCKS"),
    (lambda rows, blocks, counts: rows.__setitem__((0, L.NUM_BLOCKS), 99), "NUM_BLOCKS"),
    (lambda rows, blocks, counts: blocks.__setitem__((0, L.LEN, 1), 0), "LEN"),
    (lambda rows, blocks, counts: counts.__setitem__((0, 1), 5), "counts"),
    (lambda rows, blocks, counts: counts.__setitem__((0, 1), -1), "counts"),
])
def test_state_not_made_by_block_pipeline_is_refused(corrupt, match):
    """On the CPU the op verifies the state it is given instead of indexing past it."""
    pipe = BlockPipeline(torch.tensor([3], dtype=torch.int32), 8, 4, 0.5, 0.9)
    rows, blocks = pipe.rows.clone(), pipe.blocks.clone()
    counts = torch.zeros(1, blocks.shape[2], dtype=torch.int32)
    corrupt(rows, blocks, counts)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.d2f_ext.pipeline_step(rows, blocks, counts, torch.tensor([-1], dtype=torch.int32), 4, 0.5, 0.9)
