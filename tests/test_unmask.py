"""d2f_ext::unmask against d2f_ext.reference.unmask: decoded tokens, counts and eos_block exactly."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from d2f_ext import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(B, W, V, NB, dtype, device, seed, masked_frac=0.7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    mask_id = V - 1
    logits = (torch.randn(B, W, V, generator=g) * scale).to(dtype)
    prev = (torch.randn(B, V, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, max(V - 1, 1), (B, W), generator=g)
    tokens[torch.rand(B, W, generator=g) < masked_frac] = mask_id
    block_ids = torch.randint(-1, NB, (B, W), generator=g, dtype=torch.int32)
    fully_activated = torch.randint(0, 2, (B, NB), generator=g, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return to(logits), to(tokens), to(block_ids), to(fully_activated), to(prev), mask_id


def run_both(logits, tokens, block_ids, fully_activated, prev, mask_id, eos_id=-1, skip_threshold=0.5,
             temperature=0.0, confidence=0, seed=0):
    """The op on the tensors' device, the reference on CPU copies (the definition)."""
    ours = tokens.clone()
    counts, eos = torch.ops.d2f_ext.unmask(logits, ours, block_ids, fully_activated, prev, mask_id, eos_id,
                                           skip_threshold, temperature, confidence, seed)
    ref = tokens.cpu().clone()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    rc, re = reference.unmask(logits.cpu(), ref, block_ids.cpu(), fully_activated.cpu(), cpu(prev), mask_id, eos_id,
                              skip_threshold, temperature, confidence, seed)
    assert torch.equal(ours.cpu(), ref)
    assert torch.equal(counts.cpu(), rc)
    assert torch.equal(eos.cpu(), re)
    return ours, counts, eos


@pytest.mark.parametrize("V", [5, 257, 2051, 4099])
@pytest.mark.parametrize("confidence", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, V, confidence, temperature, shift, dtype):
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(3, 24, V, 4, dtype, device, seed=V + confidence)
    # A low skip_threshold decodes some positions, a high one leaves the forced picks to decide.
    for skip_threshold in (0.2, 0.97):
        run_both(logits, tokens, bids, fully_activated, prev if shift else None, mask_id, eos_id=3,
                 skip_threshold=skip_threshold, temperature=temperature, confidence=confidence, seed=1234)


@pytest.mark.parametrize("V", [126464, 151936])
def test_llm_vocab(device, V):
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(2, 6, V, 2, torch.bfloat16, device, seed=7, scale=6.0)
    for temperature in (0.0, 1.0):
        run_both(logits, tokens, bids, fully_activated, prev, mask_id, eos_id=5, skip_threshold=0.0001,
                 temperature=temperature, confidence=1, seed=99)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), W=st.integers(1, 40), V=st.integers(2, 600), NB=st.integers(1, 6),
       confidence=st.integers(0, 2), temperature=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
       skip_threshold=st.floats(0.0, 1.0), shift=st.booleans(), seed=st.integers(0, 2**63 - 1),
       data_seed=st.integers(0, 10**6))
def test_hypothesis_cpu(B, W, V, NB, confidence, temperature, skip_threshold, shift, seed, data_seed):
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(B, W, V, NB, torch.float32, torch.device("cpu"),
                                                          data_seed)
    run_both(logits, tokens, bids, fully_activated, prev if shift else None, mask_id, eos_id=data_seed % V,
             skip_threshold=skip_threshold, temperature=temperature, confidence=confidence, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_ties_lowest_index(device, dtype):
    V, W = 3000, 8
    logits = torch.zeros(1, W, V)
    for w in range(W):  # the max twice per row, the second copy in a later 2048-chunk for some rows
        a, b = 10 + 37 * w, 2100 + w if w % 2 else 40 + 37 * w
        logits[0, w, a] = logits[0, w, b] = 5.0
    tokens = torch.full((1, W), 0, dtype=torch.long)
    out, _, _ = run_both(logits.to(dtype).to(device), tokens.to(device), torch.zeros(1, W, dtype=torch.int32,
                         device=device), torch.ones(1, 1, dtype=torch.int32, device=device), None, 0,
                         skip_threshold=0.0)
    assert out.cpu()[0].tolist() == [10 + 37 * w for w in range(W)]


@pytest.mark.parametrize("confidence", [0, 1, 2])
def test_equal_confidence_lowest_position(device, confidence):
    V, W = 50, 10
    row = torch.randn(V)
    row[0] = row.max() + 1.0  # the argmax is not the mask id
    logits = row.expand(1, W, V).contiguous().to(device)
    tokens = torch.full((1, W), V - 1, dtype=torch.long)
    tokens[0, :3] = 0  # positions 0..2 already decoded; 3 is the first masked one of block 0
    bids = torch.tensor([[0] * 6 + [1] * 4], dtype=torch.int32)
    out, counts, _ = run_both(logits, tokens.to(device), bids.to(device),
                              torch.tensor([[1, 1]], dtype=torch.int32, device=device), None, V - 1,
                              skip_threshold=1.0, confidence=confidence)
    out = out.cpu()[0]
    assert (out != V - 1).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 6]
    assert counts.cpu().tolist() == [[1, 1]]


def test_threshold_is_strict(device):
    # Two equal logits give p = 0.5 exactly; a lone finite logit among -1e4s gives p = 1 exactly.
    half = torch.zeros(1, 2, 2)
    one = torch.full((1, 1, 300), -1e4)
    one[0, 0, 7] = 0.0
    for logits, p in ((half, 0.5), (one, 1.0)):
        W = logits.shape[1]
        args = (torch.ones(1, W, dtype=torch.int32, device=device), torch.zeros(1, 2, dtype=torch.int32,
                device=device), None, 1)
        for skip_threshold, decoded in ((p, 0), (torch.nextafter(torch.tensor(p), torch.tensor(0.0)).item(), W)):
            tokens = torch.ones(1, W, dtype=torch.long, device=device)
            _, counts, _ = run_both(logits.to(device), tokens, *args, skip_threshold=skip_threshold)
            assert counts.cpu()[0, 1].item() == decoded


def test_eos_block_lowest(device):
    V, W = 20, 9
    logits = torch.zeros(2, W, V)
    eos, mask = 4, 19
    argmax = torch.tensor([[1, 2, 4, 3, 4, 5, 4, 6, 7], [1, 2, 3, 3, 2, 5, 6, 6, 7]])
    logits.scatter_(2, argmax[..., None], 20.0)
    tokens = torch.full((2, W), mask, dtype=torch.long)
    tokens[0, 2] = 0  # the EOS prediction of block 1, row 0, lands on a decoded position
    bids = torch.tensor([[1, 1, 1, 2, 2, 2, 3, 3, 3]] * 2, dtype=torch.int32)
    _, _, eos_block = run_both(logits.to(device), tokens.to(device), bids.to(device),
                               torch.zeros(2, 4, dtype=torch.int32, device=device), None, mask, eos_id=eos,
                               skip_threshold=0.9)
    assert eos_block.cpu().tolist() == [2, -1]


def test_untouched_positions(device):
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(2, 30, 100, 3, torch.float32, device, seed=3)
    out, _, _ = run_both(logits, tokens, bids, fully_activated, prev, mask_id, skip_threshold=0.0)
    keep = (tokens != mask_id) | (bids < 0)
    assert torch.equal(out[keep], tokens[keep])


def _direct_filtered_p(x, top_k, top_p):
    """p of the argmax after top-p then top-k, from sorted probabilities (no masking)."""
    sp = torch.softmax(x.float(), -1).sort(-1, descending=True).values
    keep = (sp.cumsum(-1) - sp) <= top_p if top_p < 1.0 else torch.ones_like(sp, dtype=torch.bool)
    if top_k:
        keep[..., top_k:] = False
    return sp[..., 0] / (sp * keep).sum(-1)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (None, 0.6), (20, 0.3)])
def test_top_k_top_p(device, top_k, top_p):
    B, W, V = 2, 16, 300
    logits, tokens, _, _, _, mask_id = make_case(B, W, V, 1, torch.float32, device, seed=11, masked_frac=1.0)
    logits[..., mask_id] = -100.0  # a decoded position never shows the mask id
    bids = torch.zeros(B, W, dtype=torch.int32, device=device)
    fully_activated = torch.zeros(B, 1, dtype=torch.int32, device=device)
    p = _direct_filtered_p(logits.cpu(), top_k, top_p)
    skip_threshold = float(p.median())
    out = tokens.clone()
    ops.unmask(logits, out, bids, fully_activated, mask_id, skip_threshold=skip_threshold, top_k=top_k, top_p=top_p)
    clear = (p - skip_threshold).abs() > 1e-5
    decoded = (out.cpu() != mask_id)
    assert torch.equal(decoded[clear], (p > skip_threshold)[clear])
    assert torch.equal(out.cpu()[decoded], logits.cpu().argmax(-1)[decoded])


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (None, 1e-3)])
def test_nan_logit_does_not_switch_the_filter_off(device, top_k, top_p):
    """Filtering down to the argmax makes p = 1 at every position, with a NaN logit in each row
    too (NaN counts as -inf)."""
    B, W, V = 2, 16, 300
    logits, tokens, _, _, _, mask_id = make_case(B, W, V, 1, torch.float32, device, seed=11, masked_frac=1.0)
    logits[..., mask_id] = -100.0
    logits[..., 7 if mask_id != 7 else 8] = float("nan")
    bids = torch.zeros(B, W, dtype=torch.int32, device=device)
    fully_activated = torch.zeros(B, 1, dtype=torch.int32, device=device)
    out = tokens.clone()
    ops.unmask(logits, out, bids, fully_activated, mask_id, skip_threshold=0.99, top_k=top_k, top_p=top_p)
    assert torch.equal(out, logits.nan_to_num(float("-inf")).argmax(-1))


@pytest.mark.parametrize("kwargs, name", [(dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_k=-3), "top_k"),
                                          (dict(top_k=2.5), "top_k")])
def test_bad_top_k_top_p(kwargs, name):
    logits, tokens, bids, fully_activated, _, mask_id = make_case(1, 4, 16, 2, torch.float32, torch.device("cpu"), seed=2)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ops.unmask(logits, tokens, bids, fully_activated, mask_id, **kwargs)


def test_opcheck(device):
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(2, 8, 64, 3, torch.float32, device, seed=5)
    for args in ((logits, tokens, bids, fully_activated, prev, mask_id, 2, 0.5, 0.0, 1, 0),
                 (logits, tokens, bids, fully_activated, None, mask_id, -1, 0.9, 0.7, 2, 3)):
        torch.library.opcheck(torch.ops.d2f_ext.unmask.default, args)


def _good():
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(2, 5, 16, 3, torch.float32, torch.device("cpu"), seed=1)
    return dict(logits=logits, tokens=tokens, block_ids=bids, fully_activated=fully_activated, prev_logits=prev,
                mask_id=mask_id, eos_id=2, skip_threshold=0.9, temperature=0.0, confidence=0, seed=0)


BAD = [
    ("logits", lambda a: a["logits"][0], "logits"),
    ("logits", lambda a: a["logits"].double(), "logits"),
    ("logits", lambda a: a["logits"].transpose(1, 2).contiguous().transpose(1, 2), "logits"),
    ("tokens", lambda a: a["tokens"].int(), "tokens"),
    ("tokens", lambda a: a["tokens"][:, :4], "tokens"),
    ("tokens", lambda a: a["tokens"].t().contiguous().t(), "tokens"),
    ("tokens", lambda a: a["tokens"][None], "tokens"),
    ("block_ids", lambda a: a["block_ids"].long(), "block_ids"),
    ("block_ids", lambda a: a["block_ids"][:1], "block_ids"),
    ("block_ids", lambda a: a["block_ids"].t().contiguous().t(), "block_ids"),
    ("block_ids", lambda a: a["block_ids"].clamp(min=0) + 3, "block_ids"),
    ("block_ids", lambda a: a["block_ids"] - 2, "block_ids"),
    ("fully_activated", lambda a: a["fully_activated"].bool(), "fully_activated"),
    ("fully_activated", lambda a: a["fully_activated"][:1], "fully_activated"),
    ("fully_activated", lambda a: a["fully_activated"][0], "fully_activated"),
    ("fully_activated", lambda a: a["fully_activated"].repeat(1, 2)[:, ::2], "fully_activated"),
    ("prev_logits", lambda a: a["prev_logits"].bfloat16(), "prev_logits"),
    ("prev_logits", lambda a: a["prev_logits"][:, :8], "prev_logits"),
    ("prev_logits", lambda a: a["prev_logits"][None], "prev_logits"),
    ("prev_logits", lambda a: a["prev_logits"].repeat(1, 2)[:, ::2], "prev_logits"),
    ("mask_id", lambda a: 16, "mask_id"),
    ("mask_id", lambda a: -1, "mask_id"),
    ("eos_id", lambda a: 16, "eos_id"),
    ("skip_threshold", lambda a: 1.5, "skip_threshold"),
    ("skip_threshold", lambda a: -0.1, "skip_threshold"),
    ("temperature", lambda a: -1.0, "temperature"),
    ("temperature", lambda a: float("inf"), "temperature"),
    ("temperature", lambda a: float("nan"), "temperature"),
    ("temperature", lambda a: 1e-50, "temperature"),  # float would make it 0: greedy
    ("temperature", lambda a: 1e39, "temperature"),  # float would make it inf
    ("confidence", lambda a: 3, "confidence"),
    ("confidence", lambda a: -1, "confidence"),
]


@pytest.mark.parametrize("name,bad,match", BAD)
def test_bad_input(name, bad, match):
    args = _good()
    args[name] = bad(args)
    # Each message names its argument first: one that only mentions it (tokens' shape check
    # mentions logits) blames another.
    with pytest.raises(RuntimeError, match=rf"unmask: {match}\b"):
        torch.ops.d2f_ext.unmask(*args.values())


def test_bad_device(device):
    if device.type == "cpu":
        pytest.skip("needs a second device")
    args = _good()
    args["logits"] = args["logits"].to(device)
    with pytest.raises(RuntimeError, match="unmask: tokens"):
        torch.ops.d2f_ext.unmask(*args.values())


def test_good_input_runs():
    """The arguments every bad case starts from are accepted and decode as the reference does."""
    run_both(*_good().values())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("confidence", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_token_is_never_decoded(device, temperature, confidence, dtype):
    """A model may give [MASK] the top logit; the position must still leave the masked set, with
    the best other token and that token's probability under the full softmax."""
    logits, tokens, bids, fully_activated, prev, mask_id = make_case(2, 16, 300, 3, dtype, device, seed=11)
    logits[..., mask_id] = logits.float().amax(-1).to(dtype) + 4  # [MASK] wins everywhere
    ours, counts, _ = run_both(logits, tokens, bids, fully_activated, None, mask_id, skip_threshold=0.0,
                               temperature=temperature, confidence=confidence)
    was_masked = (tokens == mask_id) & (bids >= 0)
    assert was_masked.any() and not (ours[was_masked] == mask_id).any()
    assert int(counts.sum()) == int(was_masked.sum())
    if temperature == 0.0:
        x = logits.float().cpu()
        expected = x.clone()
        expected[..., mask_id] = float("-inf")
        assert torch.equal(ours.cpu()[was_masked.cpu()], expected.argmax(-1)[was_masked.cpu()])


# ---------------------------------------------------------------- non-finite logits

def _nonfinite_rows(V, mask_id):
    """One row per case of the rule in ops.unmask, with what the reference must give for it:
    (row, token, p)."""
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(0)
    base = lambda: torch.randn(V, generator=g)  # noqa: E731
    cases = []
    r = base(); r[5] = inf  # noqa: E702
    cases.append((r, 5, 1.0))
    r = base(); r[9] = inf; r[3] = inf  # noqa: E702
    cases.append((r, 3, 0.5))
    cases.append((torch.full((V,), -inf), 0, 1.0 / V))
    r = torch.full((V,), nan); r[7] = 2.0  # noqa: E702
    cases.append((r, 7, 1.0))
    r = base(); r[::3] = nan; r[1::3] = -inf; r[11] = 50.0  # noqa: E702
    cases.append((r, 11, None))
    r = base(); r[mask_id] = inf; r[4] = 30.0  # noqa: E702  (only [MASK] is +inf: p of token 4 is 0)
    cases.append((r, 4, 0.0))
    cases.append((torch.full((V,), nan), 0, 1.0 / V))
    return cases


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("confidence", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_logits_rule(device, temperature, confidence, dtype):
    V, mask_id = 300, 299
    cases = _nonfinite_rows(V, mask_id)
    logits = torch.stack([row for row, _, _ in cases])[None].to(dtype)
    token, p, conf = reference.token_stats(logits[0], temperature, confidence,
                                           reference.gumbel_noise(5, 1, len(cases), V)[0] if temperature else None,
                                           mask_id)
    assert not conf.isnan().any() and not p.isnan().any()
    for i, (_, want_token, want_p) in enumerate(cases):
        assert token[i].item() == want_token, i
        if want_p is not None:
            assert p[i].item() == pytest.approx(want_p, rel=1e-6, abs=1e-12), i
    W = len(cases)
    tokens = torch.full((1, W), mask_id, dtype=torch.long, device=device)
    bids = torch.zeros(1, W, dtype=torch.int32, device=device)
    for skip_threshold in (0.0, 0.4, 0.6, 0.999, 1.0):
        for fully_activated in (0, 1):
            _, counts, _ = run_both(logits.to(device), tokens, bids,
                                    torch.full((1, 1), fully_activated, dtype=torch.int32, device=device), None, mask_id,
                                    skip_threshold=skip_threshold, temperature=temperature, confidence=confidence, seed=5)
            decoded = int((p > skip_threshold).sum())
            assert counts.cpu().item() == (decoded if decoded or not fully_activated else 1)


def test_nonfinite_forced_pick_is_one_position(device):
    """A fully activated block of rows with NaN and infinite logits forces exactly one token."""
    V, W, mask_id = 64, 6, 63
    logits = torch.full((1, W, V), float("nan"))
    logits[0, 1, 10] = float("inf")
    logits[0, 2, :] = float("-inf")
    logits[0, 3, 20] = 1.0
    tokens = torch.full((1, W), mask_id, dtype=torch.long, device=device)
    for confidence in (0, 1, 2):
        out, counts, _ = run_both(logits.to(device), tokens, torch.zeros(1, W, dtype=torch.int32, device=device),
                                  torch.ones(1, 1, dtype=torch.int32, device=device), None, mask_id,
                                  skip_threshold=1.0, confidence=confidence)
        assert counts.cpu().tolist() == [[1]]
        assert int((out != mask_id).sum()) == 1


def test_vocabulary_of_the_mask_token_alone(device):
    """Nothing but [MASK] to pick: the position keeps it, with p = 1 as the reference says."""
    logits = torch.tensor([[[0.5], [float("-inf")], [float("nan")]]], device=device)
    tokens = torch.zeros(1, 3, dtype=torch.long, device=device)
    _, counts, _ = run_both(logits, tokens, torch.zeros(1, 3, dtype=torch.int32, device=device),
                            torch.zeros(1, 1, dtype=torch.int32, device=device), None, 0, skip_threshold=0.5)
    assert counts.cpu().tolist() == [[3]]
