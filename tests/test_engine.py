"""The long-lived engine: continuous batching against decoding alone, streaming, aborts and bad
requests (generate on top of it: tests/test_generate.py)."""

import random

import pytest

from d2f_ext import D2FConfig
from d2f_ext.decoding import reference_decode
from d2f_ext.engine import Engine, EngineConfig
from d2f_ext.models import load_model


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tiny_checkpoint):
    return load_model(tiny_checkpoint(request.param, seed=3))


def _prompt(model, rng):
    vocab = [t for t in range(model.config.vocab_size)
             if t not in (model.config.mask_token_id, model.config.eos_token_id)]
    return [rng.choice(vocab) for _ in range(rng.randint(1, 14))]


def _config(rng, **fixed):
    return D2FConfig(block_size=4, block_add_threshold=rng.choice([0.1, 0.25, 0.5, 1.0]),
                     decoded_token_threshold=rng.choice([0.6, 0.9, 0.95]),
                     skip_threshold=rng.choice([0.3, 0.5, 0.9]),
                     sampling_strategy=rng.choice(["default", "margin_confidence", "neg_entropy"]),
                     max_new_tokens=rng.choice([3, 8, 16, 22, 24]), **fixed)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_continuous_batching_equals_each_request_alone(model, seed, static):
    """Requests of random lengths and settings arrive at random steps into 3 rows; each one's
    tokens and forwards are those the plain-PyTorch loop gives it alone."""
    rng = random.Random(seed)
    engine = Engine(model, EngineConfig(max_batch=3, max_len=48, block_size=4, static=static, sync_every=3))
    eos = model.config.eos_token_id
    pending = [(_prompt(model, rng), _config(rng)) for _ in range(7)]
    arrivals = sorted(rng.randint(0, 12) for _ in pending)
    requests, step = [], 0
    while pending or engine.has_work():
        while pending and arrivals[len(requests)] <= step:
            prompt, cfg = pending.pop(0)
            requests.append(engine.add_request(prompt, cfg, eos_id=eos))
        engine.step()
        step += 1
        assert engine.num_active <= 3
    for r in requests:
        alone = reference_decode(model, [r.prompt], r.cfg, eos_id=eos)
        assert r.generated == alone.generated[0].tolist()
        assert r.forwards == int(alone.forwards[0])
        assert r.output == alone.tokens_before_eos(eos)[0]
        assert r.finish_reason in ("stop", "length")
    assert engine.num_active == 0


def test_sampled_request_is_the_same_beside_others(model):
    """A seeded sampled request draws the same tokens alone and beside other requests."""
    rng = random.Random(5)
    cfg = D2FConfig(block_size=4, skip_threshold=0.5, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    prompt = _prompt(model, rng)
    alone = Engine(model, EngineConfig(max_batch=1, max_len=40, block_size=4)).decode([prompt], cfg)[0]
    engine = Engine(model, EngineConfig(max_batch=4, max_len=40, block_size=4))
    others = [engine.add_request(_prompt(model, rng), _config(rng)) for _ in range(2)]
    engine.step()
    mine = engine.add_request(prompt, cfg)
    while engine.has_work():
        engine.step()
    assert mine.generated == alone.generated[0].tolist() and all(o.finished for o in others)
    assert mine.forwards == int(alone.forwards[0])


def test_prompt_admitted_mid_run_costs_only_its_positions(model, monkeypatch):
    """A long prompt joins a decoding row: the step's layers run on the two windows' positions
    only, not on the short window padded to the prompt's width, and both rows decode as alone."""
    rng = random.Random(4)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=60, block_size=4))
    steps = []
    inner = model.window_hidden

    def spy(input_ids, positions, block_ids, *a, packed=None, **kw):
        steps.append((int((block_ids >= 0).sum()), block_ids.numel(), None if packed is None else packed.numel()))
        return inner(input_ids, positions, block_ids, *a, packed=packed, **kw)

    monkeypatch.setattr(model, "window_hidden", spy)
    cfg = D2FConfig(block_size=4, skip_threshold=0.9, max_new_tokens=24)
    short = engine.add_request(_prompt(model, rng)[:2], cfg)
    engine.step()
    long = engine.add_request((_prompt(model, rng) * 30)[:30], cfg)
    while engine.has_work():
        engine.step()
    real, total, packed = steps[1]
    assert total == 2 * 34 and packed == real < total
    assert all(p is None for _, _, p in steps[:1])  # a row alone has no padding to skip
    eos = model.config.eos_token_id
    for r in (short, long):
        alone = reference_decode(model, [r.prompt], cfg, eos_id=eos)
        assert r.generated == alone.generated[0].tolist() and r.forwards == int(alone.forwards[0])


def test_last_layer_mlp_runs_on_the_read_positions_only(model):
    """Every layer but the last runs its MLP on every window position; the last one on the
    positions whose logits are read (the masked ones, Dream: shifted, plus its carried one)."""
    rng = random.Random(5)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=60, block_size=4))
    rows = []
    layers = list(model.transformer_layers())
    hooks = [layers[i].get_submodule(layers[i].PARTS[-1]).register_forward_hook(
        lambda mod, args, out, i=i: rows.append((i, args[0].shape[:-1].numel()))) for i in (0, len(layers) - 1)]
    try:
        cfg = D2FConfig(block_size=4, skip_threshold=0.9, max_new_tokens=16)
        prompts = [_prompt(model, rng) + [5] * 4 for _ in range(2)]
        for p in prompts:
            engine.add_request(p, cfg)
        engine.step()  # the first window: the prompt and block 1, whose 4 positions are masked
    finally:
        for h in hooks:
            h.remove()
    (first, every), (last, read) = rows
    assert first == 0 and last == len(layers) - 1
    assert every == sum(map(len, prompts)) + 2 * 4 and read == 2 * (4 + model.config.logit_shift)


def test_abort_frees_the_row_and_costs_no_more_compute(model, monkeypatch):
    rng = random.Random(7)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=60, block_size=4))
    batches = []
    inner = model.window_hidden

    def spy(input_ids, *a, **kw):
        batches.append(input_ids.shape[0])
        return inner(input_ids, *a, **kw)

    monkeypatch.setattr(model, "window_hidden", spy)
    cfg = D2FConfig(block_size=4, skip_threshold=0.99, max_new_tokens=40)  # slow: many steps
    a, b = engine.add_request(_prompt(model, rng), cfg), engine.add_request(_prompt(model, rng), cfg)
    engine.step()
    engine.abort(a)
    assert a.finish_reason == "abort" and engine.num_active == 1
    engine.step()
    assert batches == [2, 1]
    engine.abort(b)
    assert engine.num_active == 0 and not engine.has_work()
    assert engine.step() == [] and batches == [2, 1]



@pytest.mark.parametrize("end", ["abort", "stop"])
def test_a_static_row_freed_early_leaves_the_others_exact(model, end):
    """A row freed before its blocks are done (an abort, a stop string) stays in a static batch:
    its window is empty and it must commit nothing, while the row beside it decodes as alone."""
    import types

    engine = Engine(model, EngineConfig(max_batch=2, max_len=40, block_size=4, static=True, sync_every=1))
    # Any text holds the stop string " ": the request ends at its first decoded token.
    engine.tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ")
    eos = model.config.eos_token_id
    # b's window (2 wide) is narrower than a's committed span was: a stale span overruns it.
    slow = D2FConfig(block_size=4, skip_threshold=0.99, max_new_tokens=2)
    b = engine.add_request([5, 6, 7], slow, eos_id=eos)
    a = engine.add_request([8, 9, 10, 11, 12], D2FConfig(block_size=4, skip_threshold=0.0, max_new_tokens=16),
                           eos_id=eos, stop=[" "] if end == "stop" else ())
    engine.step()
    if end == "abort":
        engine.abort(a)
    assert a.finished and a.finish_reason == ("abort" if end == "abort" else "stop")
    while engine.has_work():
        engine.step()
    alone = reference_decode(model, [b.prompt], slow, eos_id=eos)
    assert b.generated == alone.generated[0].tolist() and b.forwards == int(alone.forwards[0])


def test_a_failed_or_interrupted_decode_leaves_the_engine_clean(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_len=40, block_size=4))
    cfg = D2FConfig(block_size=4, skip_threshold=0.99, max_new_tokens=16)
    with pytest.raises(ValueError, match="eos_id must be below the vocabulary size"):
        engine.decode([[5, 6, 7]], cfg, eos_id=model.config.vocab_size)

    def interrupt(outputs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.decode([[5, 6, 7], [8, 9]], cfg, on_step=interrupt)
    assert not engine.has_work()
    _, (r,) = engine.decode([[5, 6, 7]], cfg, eos_id=model.config.eos_token_id)
    alone = reference_decode(model, [r.prompt], cfg, eos_id=model.config.eos_token_id)
    assert r.generated == alone.generated[0].tolist()


def test_max_tokens_ends_a_request_inside_its_canvas(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_len=40, block_size=4))
    cfg = D2FConfig(block_size=4, skip_threshold=0.5, max_new_tokens=12)
    with pytest.raises(ValueError, match="max_tokens must be an integer in \\[1, 12\\]"):
        engine.add_request([5, 6, 7], cfg, max_tokens=13)
    full = engine.add_request([5, 6, 7], cfg, eos_id=-1)
    cut = engine.add_request([5, 6, 7], cfg, eos_id=-1, max_tokens=7)
    while engine.has_work():
        engine.step()
    assert cut.output == full.output[:7] and len(full.output) == 12
    assert (cut.finish_reason, full.finish_reason) == ("length", "length") and cut.end_token is None

def test_stream_of_outputs_is_the_final_text_in_order(model):
    rng = random.Random(9)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=48, block_size=4))
    cfg = D2FConfig(block_size=4, skip_threshold=0.5, max_new_tokens=24)
    reqs = [engine.add_request(_prompt(model, rng), cfg) for _ in range(3)]
    streamed = {r.id: [] for r in reqs}
    ended = []
    while engine.has_work():
        for o in engine.step():
            streamed[o.request.id] += o.new_tokens
            if o.finished:
                ended.append(o.request.id)
    assert sorted(ended) == sorted(r.id for r in reqs)
    for r in reqs:
        assert streamed[r.id] == r.output


def test_bad_requests_name_the_argument(model):
    engine = Engine(model, EngineConfig(max_batch=1, max_len=20, block_size=4))
    cfg = D2FConfig(block_size=4, max_new_tokens=8)
    with pytest.raises(ValueError, match="block_size"):
        engine.add_request([1, 2], D2FConfig(block_size=8, max_new_tokens=8))
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 15, cfg)
    with pytest.raises(ValueError, match="stop"):
        engine.add_request([1, 2], cfg, stop=[""])
    with pytest.raises(TypeError, match="cfg"):
        engine.add_request([1, 2], {"block_size": 4})
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)
    assert engine.num_waiting == 0


def test_steps_build_no_autograd_graph(model, monkeypatch):
    """The output head runs outside the layers' no_grad: the step must not record a graph."""
    engine = Engine(model, EngineConfig(max_batch=1, max_len=30, block_size=4))
    engine.add_request([1, 2, 3], D2FConfig(block_size=4, max_new_tokens=8))
    seen = []
    inner = model.head
    monkeypatch.setattr(model, "head", lambda h: seen.append(inner(h)) or seen[-1])
    engine.step()
    assert seen and not any(t.requires_grad for t in seen)


def _first_new_token(tokens: list[int], at_least: int) -> tuple[int, int]:
    """(index, token) of the first token from ``at_least`` on that does not occur before it."""
    k = next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])
    return k, tokens[k]


def test_stop_token_ids_end_a_request_as_eos_does(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_len=40, block_size=4))
    cfg = D2FConfig(block_size=4, skip_threshold=0.5, max_new_tokens=16)
    full = engine.add_request([5, 6, 7], cfg, eos_id=-1)
    while engine.has_work():
        engine.step()
    k, token = _first_new_token(full.output, 2)
    cut = engine.add_request([5, 6, 7], cfg, eos_id=-1, stop_token_ids=[token])
    while engine.has_work():
        engine.step()
    assert cut.output == full.output[:k]
    assert (cut.finish_reason, cut.end_token, full.end_token) == ("stop", token, None)
    assert cut.forwards <= full.forwards
    for bad in ([model.config.vocab_size], [model.config.mask_token_id], [True], ["7"]):
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.add_request([5, 6, 7], cfg, stop_token_ids=bad)
