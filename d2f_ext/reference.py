"""Plain-PyTorch twins of every d2f_ext op.

They define what the kernels compute, back the tests, and stand in for the compiled ops when
``d2f_ext._C`` cannot be loaded. Shapes and semantics are documented in ``d2f_ext.ops``.
"""

from __future__ import annotations

import math

import torch

from . import layout as L

_MASK32 = 0xFFFFFFFF


def attention(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows=None, scale=None):
    B, W, H, D = q.shape
    Hkv = k.shape[2]
    Bc, S = k_cache.shape[:2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, W, H, D, dtype=q.dtype, device=q.device)
    rows = cache_rows if cache_rows is not None else torch.arange(B, device=q.device)
    for b in range(B):
        # Out-of-range values (rejected only in debug mode): no cache for a bad cache row,
        # lengths clamped to [0, S]; block ids below -1 are padding like -1.
        c = int(rows[b])
        n, c = (min(max(int(cache_lens[b]), 0), S), c) if 0 <= c < Bc else (0, 0)
        keys = torch.cat([k_cache[c, :n], k[b]]).float()  # [n + W, Hkv, D]
        vals = torch.cat([v_cache[c, :n], v[b]]).float()
        keys = keys.repeat_interleave(H // Hkv, dim=1)
        vals = vals.repeat_interleave(H // Hkv, dim=1)
        bid = block_ids[b].long()
        visible = (bid[None, :] >= 0) & (bid[None, :] <= bid[:, None])  # [W, W]
        visible = torch.cat([torch.ones(W, n, dtype=torch.bool, device=q.device), visible], 1)
        scores = torch.einsum("qhd,khd->hqk", q[b].float(), keys) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        o = torch.einsum("hqk,khd->qhd", probs, vals)
        o[bid < 0] = 0
        out[b] = o.to(q.dtype)
    return out


def store_kv(k_cache, v_cache, k, v, cache_lens, src_start, src_len, cache_rows=None):
    rows = cache_rows if cache_rows is not None else torch.arange(k.shape[0], device=k.device)
    W, (Bc, S) = k.shape[1], k_cache.shape[:2]
    for b in range(k.shape[0]):
        n, s, m, c = int(cache_lens[b]), int(src_start[b]), int(src_len[b]), int(rows[b])
        # Copies out of range (rejected only in debug mode) are skipped one by one.
        i0, i1 = max(0, -s, -n), min(m, W - s, S - n)
        if not 0 <= c < Bc or i1 <= i0:
            continue
        k_cache[c, n + i0 : n + i1] = k[b, s + i0 : s + i1]
        v_cache[c, n + i0 : n + i1] = v[b, s + i0 : s + i1]


def linear(input, weight, bias=None):
    return torch.nn.functional.linear(input, weight, bias)


def rms_norm(input, weight, eps):
    # Normalised in fp32 and cast back before the scale, as both reference models do.
    h = input.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input.dtype)


def rope(input, cos, sin):
    """Rotate-half RoPE on input [B, L, H, D] with cos, sin [B, L, 1, D], computed in fp32 and
    returned in input's dtype."""
    xf = input.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(input.dtype)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic keeps the low 32 bits exact, matching the uint32 hash in params.h.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, batch: int, window: int, vocab: int, device=None) -> torch.Tensor:
    """The kernels' Gumbel noise, float32 [batch, window, vocab]."""
    t = lambda x: torch.as_tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    seed &= (1 << 64) - 1
    key = _hash32(t(seed & _MASK32) ^ _hash32(t(((seed >> 32) + 0x9E3779B9) & _MASK32)))
    key = _hash32(key ^ torch.arange(batch, device=device)[:, None])
    key = _hash32(key ^ torch.arange(window, device=device)[None, :])  # [B, W]
    h = _hash32(key[..., None] ^ torch.arange(vocab, device=device))
    u = ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)  # 24 significant bits: exact in float32
    return -torch.log(-torch.log(u))


def token_stats(rows: torch.Tensor, temperature: float, confidence: int, noise=None, mask_id=None):
    """Chosen token, its probability and the confidence for logits rows [..., V].

    The mask token is never chosen (a position decoded to it would stay masked forever); its
    probability still counts in the softmax, so p is what the unrestricted softmax gives.
    Non-finite logits follow the rule in ops.unmask: NaN counts as -inf; the softmax weighs the
    values equal to the row's max 1 each, so +inf logits share probability 1 and a row of -inf
    only is uniform; ties go to the lowest index."""
    x = rows.float()
    if temperature > 0:
        x = x / temperature
    x = x.masked_fill(x.isnan(), float("-inf"))
    top = x.amax(-1, keepdim=True)
    # x - top where x < top (never NaN), 0 where x == top: softmax of that is the rule's q.
    probs = torch.softmax(torch.where(x == top, 0.0, x - top), dim=-1)
    score = x + noise if temperature > 0 else x
    if mask_id is not None and x.shape[-1] > 1:
        # Dropping the column (not setting it to -inf) keeps the lowest-index tie rule when every
        # other score is -inf too.
        rest = torch.cat([score[..., :mask_id], score[..., mask_id + 1:]], -1).argmax(-1)
        token = rest + (rest >= mask_id).long()
    else:
        token = score.argmax(-1)
    p = probs.gather(-1, token[..., None])[..., 0]
    if confidence == L.CONF_MARGIN:
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif confidence == L.CONF_NEG_ENTROPY:
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:
        conf = p
    return token, p, conf


def unmask(logits, tokens, block_ids, fully_activated, prev_logits, mask_id, eos_id,
           skip_threshold, temperature, confidence, seed):
    B, W, V = logits.shape
    NB = fully_activated.shape[1]
    rows = logits if prev_logits is None else torch.cat([prev_logits[:, None], logits[:, :-1]], 1)
    noise = gumbel_noise(seed, B, W, V, logits.device) if temperature > 0 else None
    token, p, conf = token_stats(rows, temperature, confidence, noise, mask_id)
    counts = torch.zeros(B, NB, dtype=torch.int32, device=logits.device)
    eos_block = torch.full((B,), -1, dtype=torch.int32, device=logits.device)
    thr = torch.tensor(skip_threshold, dtype=torch.float32)
    for b in range(B):
        # Ids past NB (which only the ops' value checks reject) are skipped like padding.
        masked = (tokens[b] == mask_id) & (block_ids[b] >= 0) & (block_ids[b] < NB)
        for blk in torch.unique(block_ids[b][masked]).tolist():
            pos = torch.nonzero(masked & (block_ids[b] == blk))[:, 0]
            chosen = pos[p[b, pos] > thr]
            if len(chosen) == 0 and int(fully_activated[b, blk]):
                chosen = pos[conf[b, pos].argmax()][None]  # argmax: first index on ties
            tokens[b, chosen] = token[b, chosen]
            counts[b, blk] = len(chosen)
            if eos_id >= 0 and bool((token[b, chosen] == eos_id).any()) and (
                    eos_block[b] < 0 or blk < eos_block[b]):
                eos_block[b] = blk
    return counts, eos_block


def pipeline_step(rows, blocks, counts, eos_block, block_size, block_add_threshold, decoded_token_threshold):
    """One D2F state transition per row (see d2f_ext.layout and the spec steps in d2f_ext.pipeline):
    apply the last forward's decoded counts and EOS (spec step 6's bookkeeping), finish blocks
    (step 7), then plan the next forward: add (1), activate (2), done (3), window (4)."""
    NB = blocks.shape[2]
    for b in range(rows.shape[0]):
        r, blk = rows[b], blocks[b]
        if r[L.FINISHED]:
            continue
        blk[L.MASKED] -= counts[b]
        if eos_block[b] >= 0 and (r[L.EOS_BLOCK] < 0 or eos_block[b] < r[L.EOS_BLOCK]):
            r[L.EOS_BLOCK] = eos_block[b]
        n = int(r[L.NUM_BLOCKS])
        earlier_active = False
        for i in range(n):  # 7. finish, in order, seeing the states set earlier in this pass
            if blk[L.STATE, i] == L.ACTIVE and blk[L.MASKED, i] == 0 and not earlier_active:
                blk[L.STATE, i] = L.TO_CACHE
            earlier_active |= bool(blk[L.STATE, i] == L.ACTIVE)

        def decoded_fraction(i):
            return float(blk[L.LEN, i] - blk[L.MASKED, i]) / float(blk[L.LEN, i])

        # 1. add
        start = int(blk[L.START, n - 1] + blk[L.LEN, n - 1])
        budget_left = int(r[L.PROMPT_LEN] + r[L.GEN_LEN]) - start
        if n < NB and budget_left > 0 and r[L.EOS_BLOCK] < 0 and decoded_fraction(n - 1) >= block_add_threshold:
            size = min(block_size, budget_left)
            blk[:, n] = torch.tensor([start, size, size, L.ACTIVE, 0], dtype=blk.dtype)
            n += 1
            r[L.NUM_BLOCKS] = n
        # 2. activate
        for i in range(n - 1):
            if decoded_fraction(i) >= decoded_token_threshold:
                blk[L.FULLY_ACTIVATED, i + 1] = 1
        # 3. done (early when every block up to the first EOS is decoded: same output)
        eos = int(r[L.EOS_BLOCK])
        last = n if eos < 0 else eos + 1
        no_active = not bool((blk[L.STATE, :n] == L.ACTIVE).any())
        if (eos < 0 and no_active and int(blk[L.MASKED, :n].sum()) == 0) or (
                eos >= 0 and int(blk[L.MASKED, :last].sum()) == 0):
            r[L.FINISHED] = 1
            r[L.WIN_LEN] = 0
            r[L.COMMIT_LEN] = 0
            continue
        # 4. window: from the cache end; the to_cache span right after it is committed
        start = int(r[L.CACHE_LEN])
        commit = 0
        for i in range(n):
            if blk[L.STATE, i] == L.TO_CACHE:
                commit += int(blk[L.LEN, i])
                blk[L.STATE, i] = L.IN_CACHE
        r[L.WIN_START] = start
        r[L.WIN_LEN] = int(blk[L.START, n - 1] + blk[L.LEN, n - 1]) - start
        r[L.COMMIT_LEN] = commit
        r[L.CACHE_LEN] = start + commit
        r[L.FORWARDS] += 1
