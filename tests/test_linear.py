"""d2f_ext::linear (a linear layer at a few rows) against F.linear, its argument checks, the rule
that decides where it runs, and the model layers that run it."""

import pytest
import torch
import torch.nn.functional as F

import d2f_ext
from d2f_ext import ops

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="needs the compiled extension")


@pytest.mark.parametrize("V,K", [(1000, 128), (1001, 36), (7, 8), (13, 1), (5, 300), (3, 7)])
@pytest.mark.parametrize("R", [1, 2, 3, 5, 16])
def test_equals_linear(V, K, R):
    g = torch.Generator().manual_seed(V * 100 + R)
    w, x = torch.randn(V, K, generator=g), torch.randn(R, K, generator=g)
    torch.testing.assert_close(torch.ops.d2f_ext.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_strided_rows_and_the_thread_count_do_not_change_a_bit():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(999, 40, generator=g), torch.randn(5, 80, generator=g)[:, :40]  # rows 80 apart
    want = torch.ops.d2f_ext.linear(x.contiguous(), w)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(torch.ops.d2f_ext.linear(x, w), want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("K", [256, 37])
def test_a_row_does_not_depend_on_the_other_rows(K):
    """Rows go through tiles of 4 and a shorter last one: each output is summed in the same
    order in every tile, so a row gives the same bits alone as among 5, 9 or 16."""
    g = torch.Generator().manual_seed(K)
    w, x = torch.randn(100, K, generator=g), torch.randn(16, K, generator=g)
    alone = torch.cat([torch.ops.d2f_ext.linear(x[i:i + 1], w) for i in range(16)])
    for R in (2, 3, 5, 9, 16):
        assert torch.equal(torch.ops.d2f_ext.linear(x[:R], w), alone[:R])


def test_empty():
    assert torch.ops.d2f_ext.linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    assert torch.ops.d2f_ext.linear(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    with torch.no_grad():  # in_features 0: zeros, as F.linear gives
        assert torch.equal(ops.linear(torch.randn(2, 3, 0), torch.randn(5, 0)), torch.zeros(2, 3, 5))


BAD = [
    (lambda x, w: (x[None], w), "input must be 2-D"),
    (lambda x, w: (x.double(), w), "input must have dtype"),
    (lambda x, w: (x.t().contiguous().t(), w), "input must have a contiguous last dimension"),
    (lambda x, w: (x, w[None]), "weight must be 2-D"),
    (lambda x, w: (x, w.bfloat16()), "weight must have dtype"),
    (lambda x, w: (x, w.t().contiguous().t()), "weight must be contiguous"),
    (lambda x, w: (x, w[:, :7].contiguous()), r"weight.size\(1\) must equal input.size\(1\)"),
]


@pytest.mark.parametrize("bad,match", BAD)
def test_bad_input_names_the_argument(bad, match):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=f"linear: {match}"):
        torch.ops.d2f_ext.linear(*bad(x, w))


def test_opcheck():
    torch.library.opcheck(torch.ops.d2f_ext.linear, (torch.randn(3, 16), torch.randn(9, 16)))
    torch.library.opcheck(torch.ops.d2f_ext.linear, (torch.randn(3, 16), torch.randn(9, 16), torch.randn(9)))


@pytest.mark.parametrize("K", [64, 5, 0])
def test_the_bias_is_added_to_each_finished_sum(K):
    """Fused into the kernel, the bias gives the bits of adding it after."""
    g = torch.Generator().manual_seed(K)
    w, x, b = torch.randn(10, K, generator=g), torch.randn(7, K, generator=g), torch.randn(10, generator=g)
    assert torch.equal(torch.ops.d2f_ext.linear(x, w, b), torch.ops.d2f_ext.linear(x, w) + b)
    torch.testing.assert_close(torch.ops.d2f_ext.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (lambda b: b[None], "bias must be 1-D"),
    (lambda b: b.double(), "bias must have dtype"),
    (lambda b: b[:5], r"bias.size\(0\) must equal weight.size\(0\)"),
    (lambda b: torch.randn(12)[::2], "bias must be contiguous"),
])
def test_a_bad_bias_is_named(bad, match):
    with pytest.raises(RuntimeError, match=f"linear: {match}"):
        torch.ops.d2f_ext.linear(torch.randn(4, 8), torch.randn(6, 8), bad(torch.randn(6)))


@pytest.mark.parametrize("threads", [1, 2])
def test_where_the_kernel_runs(monkeypatch, threads):
    """ops.linear: the kernel for float32 CPU inputs of at most 48 rows, at any thread count,
    without a gradient, the bias added after; F.linear (differentiable) otherwise; the reference
    module always F.linear."""
    calls = []
    kernel = torch.ops.d2f_ext.linear
    monkeypatch.setattr(torch.ops.d2f_ext, "linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        max_rows = ops.LINEAR_KERNEL_MAX_ROWS
        assert max_rows == 48
        w, b = torch.randn(50, 16), torch.randn(50)
        few, many = torch.randn(2, max_rows // 2, 16), torch.randn(max_rows + 1, 16)
        torch.testing.assert_close(ops.linear(few, w), F.linear(few, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.linear(few, w, b), F.linear(few, w, b), rtol=1e-5, atol=1e-5)
        assert calls == [(max_rows, 16)] * 2  # leading dimensions flattened into rows
        ops.linear(many, w)
        ops.linear(few.double(), w.double())
        d2f_ext.reference.linear(few, w)
        wg = w.clone().requires_grad_()
        out = ops.linear(few, wg)
        out.sum().backward()
        assert calls == [(max_rows, 16)] * 2 and wg.grad is not None
        with torch.no_grad():
            ops.linear(few, wg)
        assert calls == [(max_rows, 16)] * 3
    finally:
        torch.set_num_threads(before)


def test_a_bias_broadcasts_as_f_linear_broadcasts_it():
    """A bias over the leading dimensions too ([L, N] for input [B, L, K]) is F.linear's too."""
    w, x = torch.randn(6, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        for bias in (torch.randn(6), torch.randn(3, 6)):
            torch.testing.assert_close(ops.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


class _Subclass(torch.nn.Linear):
    pass


def test_layers_run_plain_linears_on_the_kernel(monkeypatch):
    """project: a plain nn.Linear (bias or not) runs as impl.linear; a subclass (as PEFT's
    layers are), a module with hooks, or no impl keep the module's own forward."""
    from d2f_ext.models.layers import project
    calls = []
    monkeypatch.setattr(ops, "linear", lambda x, w, b=None: calls.append(b is not None) or F.linear(x, w, b))
    x = torch.randn(3, 8)
    plain, biased, sub = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4), _Subclass(8, 4)
    hooked = torch.nn.Linear(8, 4)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    torch.testing.assert_close(project(plain, x, ops), plain(x))
    torch.testing.assert_close(project(biased, x, ops), biased(x))
    assert calls == [False, True]
    torch.testing.assert_close(project(sub, x, ops), sub(x))
    torch.testing.assert_close(project(hooked, x, ops), hooked(x))
    torch.testing.assert_close(project(plain, x, None), plain(x))
    assert calls == [False, True]
