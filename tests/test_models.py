"""The model forwards: the full forward against a plain float64 transcription of the
architectures, and the cached window forward against the full block-causal forward."""

import math

import pytest
import torch
import torch.nn.functional as F

import d2f_ext.ops
import d2f_ext.reference
from d2f_bench.tiny import dream_config, llada_config
from d2f_ext.models import KVCache, ModelConfig, model_for_config

ATTN = {"ops": d2f_ext.ops, "reference": d2f_ext.reference}


def make_model(arch, seed=0, num_heads=4, num_kv_heads=None, tie=False, vocab=96):
    kv = num_kv_heads or (num_heads if arch == "llada" else 2)
    make = llada_config if arch == "llada" else dream_config
    cfg = ModelConfig.from_dict(make(vocab, vocab - 1, vocab - 2, 64 * num_heads // 2, num_heads, kv,
                                     2, 96, 256, tie))
    torch.manual_seed(seed)
    model = model_for_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or "ln_f" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.shape[0] == vocab and p.dim() == 2:
                p.normal_(0, 1.0 if "wte" not in name and "embed" not in name or tie else 0.05)
            else:
                p.normal_(0, 0.08)
    return model.eval()


# --- an independent transcription: parameter names straight from the state dict, float64 ---

NAMES = {
    "llada": dict(embed="model.transformer.wte", layer="model.transformer.blocks.{}.", final="model.transformer.ln_f",
                  head="model.transformer.ff_out", attn_norm="attn_norm", q="q_proj", k="k_proj", v="v_proj",
                  o="attn_out", mlp_norm="ff_norm", gate="ff_proj", up="up_proj", down="ff_out"),
    "dream": dict(embed="model.embed_tokens", layer="model.layers.{}.", final="model.norm", head="lm_head",
                  attn_norm="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj",
                  v="self_attn.v_proj", o="self_attn.o_proj", mlp_norm="post_attention_layernorm",
                  gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj"),
}


def plain_forward(model, ids, visible, positions):
    """Logits [B, L, V] in float64; visible [B, L, L] boolean (query, key)."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n = NAMES[c.arch]

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def norm(x, name, eps=c.rms_norm_eps):
        return sd[name + ".weight"] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x, pos):  # x [B, L, H, D]: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)
        half = c.head_dim // 2
        freq = torch.tensor([c.rope_theta ** (-2.0 * i / c.head_dim) for i in range(half)], dtype=torch.float64)
        ang = pos.double()[:, :, None, None] * freq
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    B, L = ids.shape
    x = sd[n["embed"] + ".weight"][ids]
    for i in range(c.num_layers):
        p = n["layer"].format(i)
        h = norm(x, p + n["attn_norm"])
        q = rope(lin(h, p + n["q"]).view(B, L, c.num_heads, -1), positions)
        k = rope(lin(h, p + n["k"]).view(B, L, c.num_kv_heads, -1), positions)
        v = lin(h, p + n["v"]).view(B, L, c.num_kv_heads, -1)
        out = torch.zeros_like(q)
        for head in range(c.num_heads):
            kvh = head // (c.num_heads // c.num_kv_heads)
            s = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kvh]) / math.sqrt(c.head_dim)
            s = s.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
            out[:, :, head] = torch.einsum("bqk,bkd->bqd", s, v[:, :, kvh])
        x = x + lin(out.reshape(B, L, -1), p + n["o"])
        h = norm(x, p + n["mlp_norm"])
        g = lin(h, p + n["gate"])
        x = x + lin(g * torch.sigmoid(g) * lin(h, p + n["up"]), p + n["down"])
    x = norm(x, n["final"])
    head = sd.get(n["head"] + ".weight", sd[n["embed"] + ".weight"])
    return x @ head.T


@pytest.mark.parametrize("arch,heads,kv,tie", [("llada", 4, 4, False), ("llada", 2, 2, True),
                                                ("dream", 4, 2, False), ("dream", 4, 1, True)])
def test_forward_matches_plain_transcription(arch, heads, kv, tie):
    model = make_model(arch, num_heads=heads, num_kv_heads=kv, tie=tie)
    torch.manual_seed(1)
    B, L = 2, 13
    ids = torch.randint(0, model.config.vocab_size, (B, L))
    # Row 1 is left-padded by 3 with RoPE positions restarting at its first real token.
    block_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 4, [-1] * 3 + [0] * 2 + [1] * 4 + [2] * 4], dtype=torch.int32)
    positions = torch.stack([torch.arange(L), (torch.arange(L) - 3).clamp(min=0)])
    with torch.no_grad():
        full = model(ids)
        causal = model(ids, block_ids=block_ids, positions=positions)
    everything = torch.ones(B, L, L, dtype=torch.bool)
    want_full = plain_forward(model, ids, everything, torch.arange(L).expand(B, L))
    bid = block_ids.long()
    visible = (bid[:, None, :] >= 0) & (bid[:, None, :] <= bid[:, :, None])
    want_causal = plain_forward(model, ids, visible, positions)
    # fp32 against float64: errors of a few ulps of the largest logit.
    atol = 1e-5 * want_full.abs().max().item()
    torch.testing.assert_close(full.double(), want_full, rtol=1e-5, atol=atol)
    real = bid >= 0
    torch.testing.assert_close(causal.double()[real], want_causal[real], rtol=1e-5, atol=atol)
    assert torch.isfinite(causal).all()  # padded queries see nothing, but must not produce NaN


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_output_embeddings_are_the_head(arch):
    untied, tied = make_model(arch, tie=False), make_model(arch, tie=True)
    head = untied.get_output_embeddings()
    h = torch.randn(2, untied.config.hidden_size)
    with torch.no_grad():  # so that ops.linear runs its kernel, not the differentiable F.linear
        torch.testing.assert_close(untied.output_logits(h), head(h))
        torch.testing.assert_close(tied.output_logits(h), F.linear(h, tied.embedding().weight))
    assert tied.get_output_embeddings() is None and tied.get_input_embeddings().weight.shape[0] == tied.config.vocab_size


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_a_hooked_head_runs_its_own_forward(arch):
    """Hooks on the head (a user's, or accelerate's offload) keep running: the module's forward
    is called, not the d2f_ext kernel on its weight."""
    model = make_model(arch, tie=False)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        model.output_logits(torch.randn(3, model.config.hidden_size))
    assert seen == [(3, model.config.vocab_size)]


def test_forward_is_differentiable():
    model = make_model("dream")
    ids = torch.randint(0, 96, (1, 9))
    block_ids = torch.tensor([[0] * 5 + [1] * 4], dtype=torch.int32)
    model(ids, block_ids=block_ids).logsumexp(-1).sum().backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# --- the cached window forward --------------------------------------------------------------

def simulate(model, prompts, block_size, n_blocks, commits, attn, device, cache_rows=None, cache_batch=None,
             packed=False, outputs=False):
    """Run D2F-like windows over rows with their own prompt lengths and commit schedules,
    changing not-yet-cached tokens between steps. After every step, each row's window logits
    must equal the full block-causal forward of that row's current tokens. packed: the layers
    run on the windows' real positions only (their hidden states at the padding are zeros).
    outputs: the forward returns a shuffled subset of each row's positions only."""
    torch.manual_seed(2)
    V, mask_id = model.config.vocab_size, model.config.mask_token_id
    B = len(prompts)
    totals = [p + n_blocks * block_size for p in prompts]
    tokens = [torch.randint(0, V, (t,), device=device) for t in totals]
    bids = [torch.tensor([0] * p + [1 + i // block_size for i in range(n_blocks * block_size)],
                         dtype=torch.int32, device=device) for p in prompts]
    cache = KVCache.for_model(model, cache_batch or B, max(totals))
    cache_lens = [0] * B
    rows = None if cache_rows is None else torch.tensor(cache_rows, dtype=torch.int32, device=device)
    for step, commit in enumerate(commits):
        ends = [min(p + (step + 1) * block_size, t) for p, t in zip(prompts, totals)]
        W = max(e - s for e, s in zip(ends, cache_lens))
        win_ids = torch.full((B, W), mask_id, device=device)
        win_pos = torch.zeros(B, W, dtype=torch.int64, device=device)
        win_bid = torch.full((B, W), -1, dtype=torch.int32, device=device)
        for b in range(B):
            s, e = cache_lens[b], ends[b]
            win_ids[b, : e - s] = tokens[b][s:e]
            win_pos[b, : e - s] = torch.arange(s, e, device=device)
            win_bid[b, : e - s] = bids[b][s:e]
        lens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
        commit_len = torch.tensor(commit, dtype=torch.int32, device=device)
        if outputs:
            # Every row asks for R positions: its real ones last to first, every other one,
            # then padding positions (whose states are not checked).
            wanted = [list(range(e - s - 1, -1, -2)) for e, s in zip(ends, cache_lens)]
            R = max(map(len, wanted))
            at = torch.tensor([w + [W - 1] * (R - len(w)) for w in wanted], device=device)
            real = win_bid.view(-1) >= 0
            hidden = model.window_hidden(win_ids, win_pos, win_bid, cache, lens, commit_len, cache_rows=rows,
                                         impl=attn, packed=real.nonzero().squeeze(1) if packed else None,
                                         outputs=at)
            assert hidden.shape[:2] == (B, R)
            logits = torch.zeros(B, W, V, device=device)
            for b, w in enumerate(wanted):
                logits[b, w] = model.head(hidden[b, : len(w)])
        elif packed:
            real = win_bid.view(-1) >= 0
            hidden = model.window_hidden(win_ids, win_pos, win_bid, cache, lens, commit_len, cache_rows=rows,
                                         impl=attn, packed=real.nonzero().squeeze(1))
            assert hidden.view(B * W, -1)[~real].abs().sum() == 0
            logits = model.head(hidden, attn)
        else:
            logits = model.forward_window(win_ids, win_pos, win_bid, cache, lens, commit_len,
                                          cache_rows=rows, impl=attn)
        for b in range(B):
            s, e = cache_lens[b], ends[b]
            with torch.no_grad():
                want = model(tokens[b][None, :e], block_ids=bids[b][None, :e])[0, s:e]
            rows_checked = list(range(e - s - 1, -1, -2)) if outputs else slice(None)
            torch.testing.assert_close(logits[b, : e - s][rows_checked], want[rows_checked], rtol=1e-4, atol=1e-4)
            cache_lens[b] += commit[b]
            # Decode a few still-uncached positions, as a D2F step would.
            change = torch.arange(cache_lens[b], e, device=device)[::3]
            tokens[b][change] = torch.randint(0, V, (len(change),), device=device)
    return cache, cache_lens


# Per step, per row: how many window rows to commit (the prompt first, then finished blocks).
COMMITS = [[7, 4], [0, 4], [4, 0], [4, 4], [0, 4], [4, 0]]


@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("arch,heads,kv", [("llada", 2, 2), ("dream", 4, 2), ("dream", 2, 1)])
def test_window_forward_matches_full_block_causal(arch, heads, kv, attn, device):
    model = make_model(arch, num_heads=heads, num_kv_heads=kv).to(device)
    simulate(model, prompts=[7, 4], block_size=4, n_blocks=5, commits=COMMITS, attn=ATTN[attn], device=device)


@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_packed_window_forward_matches_full_block_causal(arch, attn, device):
    """Rows of unequal windows (a long prompt beside a short one) with the layers run on the
    real positions only: the same logits and cache as the padded forward's."""
    model = make_model(arch).to(device)
    commits = [[11, 4, 0], [0, 4, 6], [4, 0, 4], [4, 4, 0]]
    simulate(model, prompts=[11, 4, 6], block_size=4, n_blocks=4, commits=commits, attn=ATTN[attn], device=device,
             cache_rows=[1, 3, 0], cache_batch=4, packed=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_window_forward_of_chosen_positions(arch, packed, device):
    """Final states asked for a subset of positions (the last layer's MLP runs on those only):
    the same logits as the full block-causal forward's at those positions, the same cache."""
    model = make_model(arch).to(device)
    commits = [[11, 4, 0], [0, 4, 6], [4, 0, 4], [4, 4, 0]]
    simulate(model, prompts=[11, 4, 6], block_size=4, n_blocks=4, commits=commits, attn=ATTN["ops"], device=device,
             cache_rows=[1, 3, 0], cache_batch=4, packed=packed, outputs=True)


@pytest.mark.parametrize("attn", list(ATTN))
def test_window_forward_cache_rows(attn, device):
    model = make_model("dream").to(device)
    cache, lens = simulate(model, prompts=[7, 4], block_size=4, n_blocks=5, commits=COMMITS, attn=ATTN[attn],
                           device=device, cache_rows=[2, 0], cache_batch=3)
    # Row 1 of the cache belongs to nobody: never written.
    assert cache.k[:, 1].abs().sum() == 0 and cache.v[:, 1].abs().sum() == 0
    assert cache.k[:, 2, : lens[0]].abs().sum() > 0 and cache.k[:, 0, : lens[1]].abs().sum() > 0
    assert cache.k[:, 2, lens[0]:].abs().sum() == 0


def test_window_forward_leaves_cache_lens_alone():
    model = make_model("llada")
    cache = KVCache.for_model(model, 1, 16)
    lens = torch.zeros(1, dtype=torch.int32)
    ids = torch.randint(0, 96, (1, 6))
    model.forward_window(ids, torch.arange(6)[None], torch.zeros(1, 6, dtype=torch.int32), cache, lens,
                         torch.tensor([6], dtype=torch.int32), impl=d2f_ext.reference)
    assert lens.tolist() == [0]
    assert cache.k[:, 0, :6].abs().sum() > 0 and cache.k[:, 0, 6:].abs().sum() == 0


def test_window_forward_bfloat16_close_to_float32():
    model = make_model("dream")
    ids = torch.randint(0, 96, (1, 8))
    bid = torch.tensor([[0] * 4 + [1] * 4], dtype=torch.int32)
    args = (ids, torch.arange(8)[None], bid)
    zero = torch.zeros(1, dtype=torch.int32)
    want = model.forward_window(*args, KVCache.for_model(model, 1, 8), zero, zero, impl=d2f_ext.reference)
    model16 = model.to(torch.bfloat16)
    cache16 = KVCache.for_model(model16, 1, 8)
    assert cache16.dtype == torch.bfloat16
    got = model16.forward_window(*args, cache16, zero, zero, impl=d2f_ext.reference)
    assert got.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the logits reach ~20.
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03 * want.abs().max().item())
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.7


def test_kv_cache_shapes():
    cache = KVCache(3, 2, 10, 4, 8, dtype=torch.bfloat16)
    assert cache.k[1].shape == (2, 10, 4, 8) and cache.k[1].is_contiguous()
    assert (cache.num_layers, cache.batch, cache.capacity) == (3, 2, 10)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, 1, 0, 1, 8)
