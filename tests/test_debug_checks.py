"""Debug mode (ops.set_debug_checks): index values are checked only there; outside it
out-of-range values are clamped or skipped, by the kernels and d2f_ext.reference alike."""

import pytest
import torch

from d2f_ext import ops, reference

from test_attention import make_inputs, store_inputs

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")


@pytest.fixture
def debug(request):
    """set(on): switch debug mode for this test only (the suite runs with it on)."""
    previous = ops.debug_checks()
    yield ops.set_debug_checks
    ops.set_debug_checks(previous)


def test_set_debug_checks_returns_previous(debug):
    debug(True)
    assert debug(False) is True
    assert ops.debug_checks() is False
    assert debug(True) is False


def _guarded_caches(k_cache, v_cache):
    """The caches as views into buffers with one guard row on each side, to see stray writes."""
    out = []
    for t in (k_cache, v_cache):
        big = torch.full((t.shape[0] + 2, *t.shape[1:]), 7.0, dtype=t.dtype, device=t.device)
        big[1:-1] = t
        out.append((big, big[1:-1]))
    return out


ATTENTION_VALUES = [  # (argument index, replacement, name in the debug-mode error)
    (5, lambda a: a[5] + 3, "cache_lens"),
    (5, lambda a: a[5] - 7, "cache_lens"),
    (6, lambda a: a[6] - 3, "block_ids"),
    (7, lambda a: torch.tensor([2, -1], dtype=torch.int32), "cache_rows"),
    (7, lambda a: torch.tensor([1, 9], dtype=torch.int32), "cache_rows"),
]


@pytest.mark.parametrize("index,bad,name", ATTENTION_VALUES)
def test_attention_values(debug, index, bad, name):
    args = make_inputs(2, 6, 4, 2, 32, 10, torch.float32, torch.device("cpu"), lens=[3, 10], permute_rows=True)
    args[index] = bad(args)
    debug(True)
    with pytest.raises(RuntimeError, match=f"attention: {name}"):
        torch.ops.d2f_ext.attention(*args, 0.2)
    debug(False)
    got = torch.ops.d2f_ext.attention(*args, 0.2)
    torch.testing.assert_close(got, reference.attention(*args, scale=0.2), atol=2e-5, rtol=2e-5)


STORE_VALUES = [
    (4, lambda a: a[4] + 5, "cache_lens"),
    (4, lambda a: a[4] - 3, "cache_lens"),
    (5, lambda a: a[5] - 2, "src_start"),
    (5, lambda a: a[5] + 4, r"src_start \+ src_len"),
    (6, lambda a: a[6] + 9, "src_len"),
    (7, lambda a: torch.tensor([3, -1, 0], dtype=torch.int32), "cache_rows"),
]


@pytest.mark.parametrize("index,bad,name", STORE_VALUES)
def test_store_kv_values(debug, index, bad, name):
    args = store_inputs(torch.device("cpu"), permute=True)
    args[index] = bad(args)
    (k_big, args[0]), (v_big, args[1]) = _guarded_caches(args[0], args[1])
    debug(True)
    with pytest.raises(RuntimeError, match=f"store_kv: {name}"):
        torch.ops.d2f_ext.store_kv(*args)
    debug(False)
    want_k, want_v = args[0].clone(), args[1].clone()
    reference.store_kv(want_k, want_v, *args[2:])
    torch.ops.d2f_ext.store_kv(*args)
    assert torch.equal(args[0], want_k) and torch.equal(args[1], want_v)
    for big in (k_big, v_big):
        assert torch.all(big[0] == 7.0) and torch.all(big[-1] == 7.0)


def test_store_kv_skips_only_the_copies_out_of_range(debug):
    args = store_inputs(torch.device("cpu"))
    k_cache, S = args[0], args[0].shape[1]
    args[4] = torch.tensor([-2, S - 3, 0], dtype=torch.int32)  # rows 0 and 1 start/end out of the cache
    args[5] = torch.tensor([0, 0, 6], dtype=torch.int32)
    args[6] = torch.tensor([5, 7, 6], dtype=torch.int32)  # row 2 runs past the window
    before = k_cache.clone()
    debug(False)
    torch.ops.d2f_ext.store_kv(*args)
    k = args[2]
    assert torch.equal(k_cache[0, :3], k[0, 2:5]) and torch.equal(k_cache[0, 3:], before[0, 3:])
    assert torch.equal(k_cache[1, S - 3:], k[1, :3])
    assert torch.equal(k_cache[2, :3], k[2, 6:9]) and torch.equal(k_cache[2, 3:], before[2, 3:])


def test_unmask_block_ids_past_nb_are_skipped(debug):
    g = torch.Generator().manual_seed(3)
    B, W, V, NB, mask_id = 2, 8, 40, 2, 39
    logits = torch.randn(B, W, V, generator=g) * 3
    tokens = torch.full((B, W), mask_id, dtype=torch.long)
    bids = torch.tensor([[0, 0, 1, 1, 2, 2, 5, -4]] * B, dtype=torch.int32)
    fully_activated = torch.ones(B, NB, dtype=torch.int32)
    args = (logits, tokens, bids, fully_activated, None, mask_id, -1, 0.3, 0.0, 0, 0)
    debug(True)
    with pytest.raises(RuntimeError, match="unmask: block_ids"):
        torch.ops.d2f_ext.unmask(*args)
    debug(False)
    ref = tokens.clone()
    counts, eos = torch.ops.d2f_ext.unmask(*args)
    rc, re = reference.unmask(logits, ref, *args[2:])
    assert torch.equal(counts, rc) and torch.equal(eos, re)
    assert torch.equal(tokens, ref) and torch.all(tokens[:, 4:] == mask_id)
