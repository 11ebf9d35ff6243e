"""d2f_ext attention and store_kv kernels against d2f_ext.reference."""

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2f_ext import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")

LOW_PRECISION = [torch.bfloat16, torch.float16]


def block_ids_row(W, block_size, prompt_len, first_block, pad_front, pad_back):
    """Global block ids of one window row: an optional prompt block (longer), then blocks of
    block_size, with -1 padding at both ends."""
    real = W - pad_front - pad_back
    ids = []
    for i in range(real):
        ids.append(first_block if i < prompt_len else first_block + (prompt_len > 0) + (i - prompt_len) // block_size)
    return [-1] * pad_front + ids + [-1] * pad_back


def make_inputs(B, W, H, Hkv, D, S, dtype, device, *, block_size=4, prompt_len=0, pad_front=0, pad_back=0,
                lens=None, permute_rows=False, fused=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    if fused:  # q/k/v as strided views of one fused qkv projection
        qkv = rnd(B, W, H + 2 * Hkv, D)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    else:
        q, k, v = rnd(B, W, H, D), rnd(B, W, Hkv, D), rnd(B, W, Hkv, D)
    Bc = B + 1 if permute_rows else B
    k_cache, v_cache = rnd(Bc, S, Hkv, D), rnd(Bc, S, Hkv, D)
    if lens is None:
        lens = torch.randint(0, S + 1, (B,), generator=g).tolist()
    cache_lens = torch.tensor(lens, dtype=torch.int32)
    block_ids = torch.tensor(
        [block_ids_row(W, block_size, prompt_len, 1 + b, pad_front if b % 2 == 0 else max(0, pad_front - 1),
                       pad_back if b % 2 == 0 else 0) for b in range(B)], dtype=torch.int32)
    cache_rows = torch.randperm(Bc, generator=g)[:B].to(torch.int32) if permute_rows else None
    out = [q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows]
    return [t.to(device) if t is not None else None for t in out]


def torch_low_precision(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows, scale):
    """The reference computed by torch entirely in the inputs' dtype (the tolerance yardstick)."""
    B, W, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros_like(q)
    rows = cache_rows if cache_rows is not None else torch.arange(B)
    for b in range(B):
        n, c = int(cache_lens[b]), int(rows[b])
        keys = torch.cat([k_cache[c, :n], k[b]]).repeat_interleave(G, dim=1)
        vals = torch.cat([v_cache[c, :n], v[b]]).repeat_interleave(G, dim=1)
        bid = block_ids[b].long()
        visible = torch.cat([torch.ones(W, n, dtype=torch.bool, device=q.device),
                             (bid[None, :] >= 0) & (bid[None, :] <= bid[:, None])], 1)
        scores = torch.einsum("qhd,khd->hqk", q[b], keys) * scale
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), -1).nan_to_num(0.0)
        o = torch.einsum("hqk,khd->qhd", probs, vals)
        o[bid < 0] = 0
        out[b] = o
    return out


def check_against_reference(args, scale, kernel=None):
    got = torch.ops.d2f_ext.attention(*args, scale, kernel)
    q = args[0]
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    fp32_args = [a.float() if a is not None and a.is_floating_point() else a for a in args]
    want = reference.attention(*fp32_args, scale=scale)
    padding = args[6] < 0
    assert torch.all(got[padding.to(got.device)] == 0)
    if q.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        return
    # Issue rule: no more than twice the error of torch doing the same math in that dtype.
    cpu_args = [a.cpu() if a is not None else None for a in args]
    if q.dtype == torch.float16:
        cpu_args = [a.to(torch.float32).to(torch.float16) if a is not None and a.is_floating_point() else a
                    for a in cpu_args]
    lowp = torch_low_precision(*cpu_args, scale)
    err = (got.float().cpu() - want.cpu()).abs().max().item()
    torch_err = (lowp.float() - want.cpu()).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def dtype_ok(dtype, device):
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 is CUDA-only")


# The CUDA kernels: "simt" and the tensor-core "mma" (which runs "simt" for what it does not
# support: float32, head_dim other than 64 and 128). The CPU has one kernel.
KERNELS = ["simt", "mma"]


def kernel_ok(kernel, device):
    if kernel == "mma" and device.type == "cpu":
        pytest.skip("the tensor-core kernel is CUDA-only")


CASES = [  # B, W, H, Hkv, D, S, block_size, prompt_len, pad_front, pad_back, lens
    (1, 8, 2, 2, 64, 16, 4, 0, 0, 0, [0]),
    (2, 13, 4, 2, 64, 40, 3, 5, 1, 2, [7, 40]),
    (3, 33, 8, 2, 128, 80, 16, 10, 0, 3, [0, 80, 31]),
    (1, 37, 4, 1, 32, 100, 1, 0, 2, 0, [99]),
    (2, 64, 4, 4, 128, 130, 8, 20, 0, 0, [0, 129]),
    (3, 20, 8, 4, 64, 50, 5, 7, 3, 3, None),
    (1, 70, 2, 1, 256, 30, 16, 32, 0, 5, [30]),
    (2, 1, 2, 1, 64, 8, 1, 0, 0, 0, [3, 0]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}W{}H{}kv{}D{}S{}".format(*c[:6]))
@pytest.mark.parametrize("permute_rows,fused", [(False, False), (True, True)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_matches_reference(device, dtype, case, permute_rows, fused, kernel):
    dtype_ok(dtype, device)
    kernel_ok(kernel, device)
    B, W, H, Hkv, D, S, bs, prompt, pf, pb, lens = case
    args = make_inputs(B, W, H, Hkv, D, S, dtype, device, block_size=bs, prompt_len=prompt, pad_front=pf,
                       pad_back=pb, lens=lens, permute_rows=permute_rows, fused=fused)
    check_against_reference(args, 1.0 / math.sqrt(D), kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_attention_all_padding_and_custom_scale(device, kernel, dtype):
    dtype_ok(dtype, device)
    kernel_ok(kernel, device)
    args = make_inputs(2, 9, 4, 2, 64, 12, dtype, device, lens=[5, 0])
    args[6][0] = -1  # row 0: nothing but padding
    check_against_reference(args, 0.3, kernel)
    assert torch.all(torch.ops.d2f_ext.attention(*args, 0.3, kernel)[0] == 0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_more_than_16_query_heads_per_kv_head(device, kernel):
    """Multi-query attention with 24 query heads on one KV head, also with a row of padding only
    (the CPU kernel once looped forever there, splitting a one-token tile)."""
    kernel_ok(kernel, device)
    args = make_inputs(2, 3, 24, 1, 64, 8, torch.float32, device, lens=[5, 0])
    check_against_reference(args, 0.125, kernel)
    args[6][1] = -1
    check_against_reference(args, 0.125, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_large_window_many_tiles(device, kernel, dtype):
    """Windows longer than the kernels' query and key tiles, with GQA and a long prompt block."""
    kernel_ok(kernel, device)
    args = make_inputs(1, 150, 8, 2, 64, 300, dtype, device, block_size=7, prompt_len=40, lens=[257])
    check_against_reference(args, 0.125, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_padding_mid_row(device, kernel, dtype, D):
    """Padding between real tokens (and a row whose window is padding but for one token)."""
    dtype_ok(dtype, device)
    kernel_ok(kernel, device)
    args = make_inputs(2, 40, 8, 2, D, 90, dtype, device, block_size=4, prompt_len=6, lens=[90, 17])
    args[6][0, [3, 9, 10, 25, 39]] = -1
    args[6][1, :] = -1
    args[6][1, 20] = 7
    check_against_reference(args, 1.0 / math.sqrt(D), kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_long_cache_few_heads(device, kernel, dtype, D):
    """Few (row tile, kv head, row) work items over long caches: the tensor-core kernel splits
    the cache (split-KV); rows whose cache is empty, ends mid-split or is full."""
    dtype_ok(dtype, device)
    kernel_ok(kernel, device)
    args = make_inputs(3, 24, 4, 2, D, 1100, dtype, device, block_size=8, lens=[700, 0, 1100],
                       permute_rows=True)
    check_against_reference(args, 1.0 / math.sqrt(D), kernel)


@pytest.mark.cuda
def test_attention_mma_kernel_is_a_different_kernel():
    """The tensor-core kernel really runs for a supported call (its rounding differs from the
    SIMT kernel's in some output) instead of silently falling back; both match the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = make_inputs(2, 32, 8, 2, 128, 200, torch.bfloat16, torch.device("cuda"), lens=[150, 200])
    simt = torch.ops.d2f_ext.attention(*args, 0.1, "simt")
    mma = torch.ops.d2f_ext.attention(*args, 0.1, "mma")
    assert not torch.equal(simt, mma)
    check_against_reference(args, 0.1, "mma")


def test_attention_rejects_unknown_kernel():
    args = _attn_args(torch.device("cpu"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        ops.attention(*args, kernel="tensor")
    with pytest.raises(RuntimeError, match='attention: kernel must be "simt" or "mma", got "tensor"'):
        torch.ops.d2f_ext.attention(*args, 0.1, "tensor")
    want = torch.ops.d2f_ext.attention(*args, 0.1)
    assert torch.equal(ops.attention(*args, scale=0.1, kernel="mma"), want)  # the CPU has one kernel


def test_attention_kernel_from_environment():
    """D2F_EXT_ATTENTION picks the kernel of calls that name none; a bad value is an error."""
    code = ("import torch; from d2f_ext import ops; z = torch.zeros(1, 1, 1, 8); "
            "ops.attention(z, z, z, z, z, torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32))")
    # Run in the folder holding the d2f_ext under test: `python -c` puts its working directory first
    # on the path, where a source tree without the built _C would shadow it.
    home = str(pathlib.Path(ops.__file__).parent.parent)
    env = dict(os.environ, D2F_EXT_ATTENTION="tensor", PYTHONPATH=home)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=home, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert 'the D2F_EXT_ATTENTION environment variable must be "simt" or "mma", got "tensor"' in run.stderr
    env["D2F_EXT_ATTENTION"] = "mma"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=home, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), W=st.integers(1, 40), Hkv=st.integers(1, 3), ratio=st.sampled_from([1, 2, 4]),
       D=st.sampled_from([8, 16, 32, 64, 128]), S=st.integers(1, 70), bs=st.integers(1, 16),
       prompt=st.integers(0, 12), pf=st.integers(0, 3), pb=st.integers(0, 3), seed=st.integers(0, 2**16),
       permute=st.booleans(), fused=st.booleans(), bf16=st.booleans())
def test_attention_random_shapes(B, W, Hkv, ratio, D, S, bs, prompt, pf, pb, seed, permute, fused, bf16):
    pf, pb = min(pf, W // 2), min(pb, W // 2)
    dtype = torch.bfloat16 if bf16 else torch.float32
    args = make_inputs(B, W, Hkv * ratio, Hkv, D, S, dtype, torch.device("cpu"), block_size=bs,
                       prompt_len=prompt, pad_front=pf, pad_back=pb, permute_rows=permute, fused=fused, seed=seed)
    check_against_reference(args, 1.0 / math.sqrt(D))


def test_attention_opcheck(device):
    args = make_inputs(2, 6, 4, 2, 32, 10, torch.float32, device, lens=[3, 10], permute_rows=True)
    torch.library.opcheck(torch.ops.d2f_ext.attention, (*args, 0.2))


# ---------------------------------------------------------------- store_kv


def store_inputs(device, dtype=torch.float32, fused=False, permute=False):
    B, W, Hkv, D, S = 3, 9, 2, 16, 20
    _, k, v, k_cache, v_cache, _, _, rows = make_inputs(B, W, 2 * Hkv, Hkv, D, S, dtype, device, fused=fused,
                                                       permute_rows=permute)
    lens = torch.tensor([0, 11, 20 - 4], dtype=torch.int32, device=device)
    start = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    length = torch.tensor([9, 7, 4], dtype=torch.int32, device=device)
    return [k_cache, v_cache, k, v, lens, start, length, rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused,permute", [(False, False), (True, True)])
def test_store_kv_matches_reference(device, dtype, fused, permute):
    dtype_ok(dtype, device)
    args = store_inputs(device, dtype, fused, permute)
    want_k, want_v = args[0].clone(), args[1].clone()
    reference.store_kv(want_k, want_v, *args[2:])
    torch.ops.d2f_ext.store_kv(*args)
    assert torch.equal(args[0], want_k) and torch.equal(args[1], want_v)


def test_store_kv_opcheck(device):
    torch.library.opcheck(torch.ops.d2f_ext.store_kv, tuple(store_inputs(device, permute=True)))


# ---------------------------------------------------------------- bad inputs


def _attn_args(device):
    return make_inputs(2, 6, 4, 2, 32, 10, torch.float32, device, lens=[3, 10])


def _noncontig_last(t):
    return torch.cat([t, t], -1)[..., ::2]


ATTENTION_BAD = [  # (argument index, replacement built from the good args, message pattern)
    (0, lambda a: a[0][0], "q must be 4-D"),
    (0, lambda a: a[0].double(), "q must have dtype"),
    (0, lambda a: _noncontig_last(a[0]), "q must have a contiguous last dimension"),
    (0, lambda a: a[0][..., :12], "head_dim"),
    (1, lambda a: a[1][0], "k must be 4-D"),
    (1, lambda a: a[1].bfloat16(), "k must have the dtype of q"),
    (1, lambda a: a[1][:1], r"k.size\(0\)"),
    (1, lambda a: a[1][:, :5], r"k.size\(1\)"),
    (1, lambda a: _noncontig_last(a[1]), "k must have a contiguous last dimension"),
    (2, lambda a: a[2][:, :, :1], r"v.size\(2\)"),
    (2, lambda a: torch.cat([a[2], a[2]], -1), r"v.size\(3\)"),
    ((1, 2), lambda a: [torch.cat([t] * 2, 2)[:, :, :3] for t in a[1:3]], "multiple of the kv heads"),
    (3, lambda a: a[3].transpose(0, 1).contiguous().transpose(0, 1), "k_cache must be contiguous"),
    (3, lambda a: a[3][:, :, :1].contiguous(), r"k_cache.size\(2\)"),
    (3, lambda a: a[3].bfloat16(), "k_cache must have the dtype of q"),
    (4, lambda a: a[4][:1].contiguous(), r"v_cache.size\(0\)"),
    (4, lambda a: a[4][:, :5].contiguous(), r"v_cache.size\(1\)"),
    (4, lambda a: a[4][..., :16].contiguous(), r"v_cache.size\(3\)"),
    (5, lambda a: a[5].long(), "cache_lens must have dtype"),
    (5, lambda a: a[5][:1], r"cache_lens.size\(0\)"),
    (5, lambda a: a[5] + 1, "cache_lens values"),
    (5, lambda a: a[5] - 4, "cache_lens values"),
    (6, lambda a: a[6].long(), "block_ids must have dtype"),
    (6, lambda a: a[6][:, :5], r"block_ids.size\(1\)"),
    (6, lambda a: a[6].t().contiguous().t(), "block_ids must be contiguous"),
    (6, lambda a: a[6].flip(1), "non-decreasing"),
    (6, lambda a: a[6] - 3, "block_ids must be >= -1"),
    (7, lambda a: torch.tensor([0, 2], dtype=torch.int32, device=a[0].device), "cache_rows values"),
    (7, lambda a: torch.tensor([0, 1], device=a[0].device), "cache_rows must have dtype"),
    ((3, 4), lambda a: [t[:1].contiguous() for t in a[3:5]], "k_cache needs at least"),
]


@pytest.mark.parametrize("index,bad,match", ATTENTION_BAD, ids=[m for _, _, m in ATTENTION_BAD])
def test_attention_bad_inputs(device, index, bad, match):
    args = _attn_args(device)
    if isinstance(index, tuple):
        for i, t in zip(index, bad(args)):
            args[i] = t
    else:
        args[index] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.d2f_ext.attention(*args, 0.1)


def test_attention_rejects_float16_on_cpu():
    args = [a.half() if a is not None and a.is_floating_point() else a for a in _attn_args(torch.device("cpu"))]
    with pytest.raises(RuntimeError, match="q must have dtype"):
        torch.ops.d2f_ext.attention(*args, 0.1)


@pytest.mark.cuda
def test_attention_rejects_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = _attn_args(torch.device("cuda"))
    args[5] = args[5].cpu()
    with pytest.raises(RuntimeError, match="cache_lens must be on the device of q"):
        torch.ops.d2f_ext.attention(*args, 0.1)


STORE_BAD = [
    (2, lambda a: a[2][0], "k must be 4-D"),
    (2, lambda a: a[2].double(), "k must have dtype"),
    (3, lambda a: a[3][:, :, :1], r"v.size\(2\)"),
    (3, lambda a: a[3].bfloat16(), "v must have the dtype of k"),
    (0, lambda a: a[0].transpose(0, 1).contiguous().transpose(0, 1), "k_cache must be contiguous"),
    (1, lambda a: a[1][:, :10].contiguous(), r"v_cache.size\(1\)"),
    (4, lambda a: a[4] + 5, "cache_lens values"),
    (5, lambda a: a[5] - 1, "src_start values"),
    (6, lambda a: a[6] - 10, "src_len values"),
    (5, lambda a: a[5] + 3, r"src_start \+ src_len"),
    (4, lambda a: a[4] + 1, "cache overflow"),
    (6, lambda a: a[6][:2], r"src_len.size\(0\)"),
    (7, lambda a: torch.tensor([0, 1, 3], dtype=torch.int32, device=a[2].device), "cache_rows values"),
]


@pytest.mark.parametrize("index,bad,match", STORE_BAD, ids=[m for _, _, m in STORE_BAD])
def test_store_kv_bad_inputs(device, index, bad, match):
    args = store_inputs(device)
    args[index] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.d2f_ext.store_kv(*args)
