"""d2f_ext::rms_norm and d2f_ext::rope (a layer's norms and rotary embedding) against their
d2f_ext.reference twins, their argument checks, the rule that decides where they run, and the
model layers that run them."""

import pytest
import torch

import d2f_ext
from d2f_ext import ops, reference
from d2f_ext.models.layers import RMSNorm, normalize, rope_cos_sin

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="needs the compiled extension")


@pytest.mark.parametrize("shape", [(16, 256), (3, 5, 13), (1, 8), (2, 1), (7, 1, 100)])
def test_rms_norm_equals_reference(shape):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(torch.ops.d2f_ext.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    # Rows apart by more than their length, as a slice of a wider tensor leaves them.
    wide = torch.randn(*shape[:-1], shape[-1] + 3, generator=g)[..., :shape[-1]]
    torch.testing.assert_close(torch.ops.d2f_ext.rms_norm(wide, w, 1e-6), reference.rms_norm(wide, w, 1e-6))


def test_rms_norm_of_zeros_and_empty():
    w = torch.randn(8)
    assert torch.equal(torch.ops.d2f_ext.rms_norm(torch.zeros(3, 8), w, 1e-5), torch.zeros(3, 8))
    assert torch.ops.d2f_ext.rms_norm(torch.zeros(0, 8), w, 1e-5).shape == (0, 8)
    assert torch.ops.d2f_ext.rms_norm(torch.zeros(3, 0), torch.zeros(0), 1e-5).shape == (3, 0)


@pytest.mark.parametrize("B,L,H,D", [(1, 16, 4, 64), (2, 5, 3, 128), (1, 3, 2, 6), (2, 1, 1, 2), (1, 7, 2, 20)])
def test_rope_is_the_reference_bit_for_bit(B, L, H, D):
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 4000, (B, L), generator=g)
    cos, sin = rope_cos_sin(positions, D, 500000.0)
    x = torch.randn(B, L, H, D, generator=g) * 10
    assert torch.equal(torch.ops.d2f_ext.rope(x, cos, sin), reference.rope(x, cos, sin))
    # Heads apart by more than head_dim (a slice of a fused projection), and tokens laid out
    # head-major, which the op copies first.
    sliced = torch.randn(B, L, H, D + 4, generator=g)[..., :D]
    assert torch.equal(torch.ops.d2f_ext.rope(sliced, cos, sin), reference.rope(sliced, cos, sin))
    head_major = torch.randn(B, H, L, D, generator=g).transpose(1, 2)
    assert torch.equal(torch.ops.d2f_ext.rope(head_major, cos, sin), reference.rope(head_major, cos, sin))


BAD = [
    ("rms_norm", lambda: (torch.randn(4, 8).double(), torch.randn(8), 1e-5), "rms_norm: input must have dtype"),
    ("rms_norm", lambda: (torch.randn(4, 8), torch.randn(7), 1e-5), r"rms_norm: weight.size\(0\) must equal input.size\(-1\)"),
    ("rms_norm", lambda: (torch.randn(4, 8), torch.randn(2, 8), 1e-5), "rms_norm: weight must be 1-D"),
    ("rms_norm", lambda: (torch.randn(4, 8), torch.randn(8).bfloat16(), 1e-5), "rms_norm: weight must have dtype"),
    ("rope", lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)), "rope: input must be 4-D"),
    ("rope", lambda: (torch.randn(1, 3, 2, 7), torch.randn(1, 3, 1, 7), torch.randn(1, 3, 1, 7)),
     r"rope: input.size\(3\) \(head_dim\) must be even"),
    ("rope", lambda: (torch.randn(1, 3, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 3, 1, 8)),
     r"rope: cos.size\(1\) must equal input.size\(1\)"),
    ("rope", lambda: (torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 2, 8)),
     r"rope: sin.size\(2\) must equal 1"),
    ("rope", lambda: (torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8).double(), torch.randn(1, 3, 1, 8)),
     "rope: cos must have dtype"),
    ("rope", lambda: (torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 16)[..., ::2], torch.randn(1, 3, 1, 8)),
     "rope: cos must be contiguous"),
]


@pytest.mark.parametrize("op,args,match", BAD)
def test_bad_input_names_the_argument(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.d2f_ext, op)(*args())


@pytest.mark.parametrize("op,args", [
    ("rms_norm", (torch.randn(3, 5, 16), torch.randn(16), 1e-6)),
    ("rope", (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.d2f_ext, op), args)


def test_ops_run_the_kernels_only_where_they_apply(monkeypatch):
    """float32 CPU tensors with no gradient wanted: the kernel; otherwise the reference, which
    keeps training differentiable and other dtypes and devices working."""
    calls = []
    for name in ("rms_norm", "rope"):
        kernel = getattr(torch.ops.d2f_ext, name)
        monkeypatch.setattr(torch.ops.d2f_ext, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    x, w = torch.randn(4, 8), torch.randn(8)
    q, cos, sin = torch.randn(1, 4, 2, 8), *rope_cos_sin(torch.arange(4)[None], 8, 10000.0)
    with torch.no_grad():
        ops.rms_norm(x, w, 1e-5), ops.rope(q, cos, sin)
    assert calls == ["rms_norm", "rope"]
    wg = w.clone().requires_grad_()
    out = ops.rms_norm(x, wg, 1e-5)
    out.sum().backward()
    assert wg.grad is not None
    ops.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5), ops.rope(q.double(), cos, sin)
    assert calls == ["rms_norm", "rope"]


class _Norm(RMSNorm):
    pass


def test_layers_run_plain_norms_on_the_kernel(monkeypatch):
    """normalize: a plain RMSNorm runs as impl.rms_norm; a subclass, a module with hooks, or no
    impl keep the module's own forward."""
    calls = []
    monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps: calls.append(eps) or reference.rms_norm(x, w, eps))
    x = torch.randn(3, 8)
    plain, sub, hooked = RMSNorm(8, 1e-5), _Norm(8, 1e-6), RMSNorm(8, 1e-5)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    torch.testing.assert_close(normalize(plain, x, ops), plain(x))
    assert calls == [1e-5]
    torch.testing.assert_close(normalize(sub, x, ops), sub(x))
    torch.testing.assert_close(normalize(hooked, x, ops), 2 * plain(x))
    torch.testing.assert_close(normalize(plain, x, None), plain(x))
    assert calls == [1e-5]


def test_a_window_forward_runs_every_part_on_its_kernel(monkeypatch):
    """The decoding path: each layer's two norms and q and k's RoPE, and the final norm, run as
    d2f_ext ops; the result equals the plain-PyTorch path's."""
    from d2f_ext.models import KVCache, ModelConfig, model_for_config

    cfg = ModelConfig.from_dict(dict(model_type="Dream", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-6,
                                     rope_theta=10000.0, mask_token_id=49, eos_token_id=48))
    model = model_for_config(cfg).eval()
    calls = []
    for name in ("rms_norm", "rope"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    ids = torch.randint(0, 48, (1, 6))
    args = (ids, torch.arange(6)[None], torch.zeros(1, 6, dtype=torch.int32))
    lens = torch.zeros(1, dtype=torch.int32)
    got = model.forward_window(*args, KVCache.for_model(model, 1, 8), lens, lens)
    want = model.forward_window(*args, KVCache.for_model(model, 1, 8), lens, lens, impl=d2f_ext.reference)
    assert sorted(calls) == ["rms_norm"] * 5 + ["rope"] * 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
