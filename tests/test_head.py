"""d2f_ext::head (the output head at a few rows) against F.linear, its argument checks, and the
rule that decides where it runs."""

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
    torch.testing.assert_close(torch.ops.d2f_ext.head(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_strided_rows_and_the_thread_count_do_not_change_a_bit():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(999, 40, generator=g), torch.randn(5, 80, generator=g)[:, :40]  # rows 80 apart
    want = torch.ops.d2f_ext.head(x.contiguous(), w)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(torch.ops.d2f_ext.head(x, w), want)
    finally:
        torch.set_num_threads(before)


def test_empty():
    assert torch.ops.d2f_ext.head(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    assert torch.ops.d2f_ext.head(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    with torch.no_grad():  # hidden size 0: zeros, as F.linear gives
        assert torch.equal(ops.head(torch.randn(2, 3, 0), torch.randn(5, 0)), torch.zeros(2, 3, 5))


BAD = [
    (lambda x, w: (x[None], w), "hidden must be 2-D"),
    (lambda x, w: (x.double(), w), "hidden must have dtype"),
    (lambda x, w: (x.t().contiguous().t(), w), "hidden must have a contiguous last dimension"),
    (lambda x, w: (x, w[None]), "weight must be 2-D"),
    (lambda x, w: (x, w.bfloat16()), "weight must have dtype"),
    (lambda x, w: (x, w.t().contiguous().t()), "weight must be contiguous"),
    (lambda x, w: (x, w[:, :7].contiguous()), r"weight.size\(1\) must equal hidden.size\(1\)"),
]


@pytest.mark.parametrize("bad,match", BAD)
def test_bad_input_names_the_argument(bad, match):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=f"head: {match}"):
        torch.ops.d2f_ext.head(*bad(x, w))


def test_opcheck():
    torch.library.opcheck(torch.ops.d2f_ext.head, (torch.randn(3, 16), torch.randn(9, 16)))


def test_where_the_kernel_runs(monkeypatch):
    """ops.head: the kernel for float32 CPU inputs of at most HEAD_KERNEL_MAX_ROWS rows without a
    gradient; F.linear (differentiable) otherwise; the reference module always F.linear."""
    calls = []
    kernel = torch.ops.d2f_ext.head
    monkeypatch.setattr(torch.ops.d2f_ext, "head", lambda *a: calls.append(a[0].shape) or kernel(*a))
    w = torch.randn(50, 16)
    few, many = torch.randn(2, 3, 16), torch.randn(ops.HEAD_KERNEL_MAX_ROWS + 1, 16)
    torch.testing.assert_close(ops.head(few, w), F.linear(few, w), rtol=1e-5, atol=1e-5)
    assert calls == [(6, 16)]  # leading dimensions flattened into rows
    ops.head(many, w)
    ops.head(few.double(), w.double())
    d2f_ext.reference.head(few, w)
    wg = w.clone().requires_grad_()
    out = ops.head(few, wg)
    out.sum().backward()
    assert calls == [(6, 16)] and wg.grad is not None
    with torch.no_grad():
        ops.head(few, wg)
    assert calls == [(6, 16), (6, 16)]
