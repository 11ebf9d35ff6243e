"""The long-lived engine: continuous batching against decoding alone, stop strings, aborts,
reuse across calls, and generate's transformers semantics on top of it."""

import random

import pytest
import torch
from transformers import GenerationConfig

from d2f_ext import AutoD2FModel, D2FConfig
from d2f_ext.decoding import reference_decode
from d2f_ext.engine import Engine, EngineConfig
from d2f_ext.models import KVCache, load_model


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


# --- generate on the engine -----------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_model(tiny_checkpoint):
    return AutoD2FModel.from_pretrained(tiny_checkpoint("llada", seed=5))


KW = dict(block_size=4, block_add_threshold=0.25, decoded_token_threshold=0.9, skip_threshold=0.5)


def _encode(model, texts):
    tok = model.tokenizer
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_second_generate_of_the_same_shapes_builds_nothing(auto_model, monkeypatch):
    enc = _encode(auto_model, ["the cat sat", "two plus two"])
    first = auto_model.generate(**enc, max_new_tokens=16, **KW)
    engine = auto_model.d2f_engine
    built = []
    monkeypatch.setattr(Engine, "__init__", lambda *a, **k: built.append("engine"))
    inner = KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a, **k: (built.append("cache"), inner(self, *a, **k)))
    cache_ptr = engine.cache.k.data_ptr()
    again = auto_model.generate(**enc, max_new_tokens=16, **KW)
    assert built == [] and auto_model.d2f_engine is engine and engine.cache.k.data_ptr() == cache_ptr
    assert torch.equal(first, again) and engine.graph_captures == 0


def test_stop_strings_end_the_row(auto_model):
    tok = auto_model.tokenizer
    enc = _encode(auto_model, ["the cat sat on the"])
    full = auto_model.generate(**enc, max_new_tokens=24, return_dict_in_generate=True, **KW)
    width = enc["input_ids"].shape[1]
    text = tok.decode(full.sequences[0, width:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 3, text
    stop = words[1]
    cut = auto_model.generate(**enc, max_new_tokens=24, stop_strings=[stop], return_dict_in_generate=True, **KW)
    got = tok.decode(cut.sequences[0, width:], skip_special_tokens=True)
    assert stop in got and text.startswith(got.rstrip())
    # The tokens end with the one that completes the stop string: one fewer has no stop string.
    n = int(cut.new_tokens[0])
    assert stop not in tok.decode(cut.sequences[0, width:width + n - 1], skip_special_tokens=True)
    assert int(cut.forwards[0]) <= int(full.forwards[0])


def test_max_new_tokens_below_the_block_size_decodes_one_short_block(auto_model):
    enc = _encode(auto_model, ["one two three"])
    out = auto_model.generate(**enc, max_new_tokens=3, return_dict_in_generate=True, **KW)
    assert int(out.new_tokens[0]) <= 3 and out.sequences.shape[1] <= enc["input_ids"].shape[1] + 4
    ref = auto_model.generate(**enc, max_new_tokens=3, decoder="reference", **KW)
    assert torch.equal(out.sequences, ref)


def test_max_length_counts_the_prompt(auto_model):
    enc = _encode(auto_model, ["one two three"])
    width = enc["input_ids"].shape[1]
    by_length = auto_model.generate(**enc, max_length=width + 8, **KW)
    assert torch.equal(by_length, auto_model.generate(**enc, max_new_tokens=8, **KW))
    with pytest.raises(ValueError, match="max_length"):
        auto_model.generate(**enc, max_length=width, **KW)


def test_passed_generation_config_keeps_the_checkpoint_fields_it_does_not_set(auto_model, monkeypatch):
    enc = _encode(auto_model, ["the dog"])
    saved = GenerationConfig(block_size=4, block_add_threshold=0.25, decoded_token_threshold=0.9,
                             skip_threshold=0.5, max_new_tokens=12)
    monkeypatch.setattr(auto_model, "generation_config", saved)
    merged = auto_model.generate(**enc, generation_config=GenerationConfig(skip_threshold=0.3))
    explicit = auto_model.generate(**enc, max_new_tokens=12, **{**KW, "skip_threshold": 0.3})
    assert torch.equal(merged, explicit)


def test_input_ids_must_be_integers(auto_model):
    with pytest.raises(TypeError, match="input_ids"):
        auto_model.generate(torch.ones(1, 3), max_new_tokens=4, **KW)


def test_tokens_per_forward_does_not_count_the_eos(auto_model):
    """A row that ends in EOS: new_tokens and tokens_per_forward count the tokens before it."""
    enc = _encode(auto_model, ["the cat"])
    width = enc["input_ids"].shape[1]
    free = auto_model.generate(**enc, max_new_tokens=16, **KW)[0, width:].tolist()
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k])
    out = auto_model.generate(**enc, max_new_tokens=16, eos_token_id=free[k], return_dict_in_generate=True, **KW)
    row, n = out.sequences[0, width:].tolist(), int(out.new_tokens[0])
    assert n >= 2 and row[n] == free[k] and free[k] not in row[:n]
    assert float(out.tokens_per_forward[0]) == pytest.approx(n / int(out.forwards[0]))
