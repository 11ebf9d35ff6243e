"""The drop-in generate: HF semantics, streaming, the CLI, on tiny checkpoints in real formats."""

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from transformers import GenerationConfig, TextStreamer

from d2f_ext import AutoD2FModel, D2FConfig, cli, patch
from d2f_ext.decoding import decode
from d2f_ext.engine import Engine
from d2f_ext.models import KVCache, load_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return AutoD2FModel.from_pretrained(tiny_checkpoint("llada", seed=5))


KW = dict(block_size=4, block_add_threshold=0.25, decoded_token_threshold=0.9, skip_threshold=0.5)


def _encode(model, texts):
    tok = model.tokenizer
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_returns_prompt_then_tokens_through_eos_then_pad(model):
    enc = _encode(model, ["what is two plus three ?", "the cat"])
    out = model.generate(**enc, max_new_tokens=16, return_dict_in_generate=True, **KW)
    seq = out.sequences
    width = enc["input_ids"].shape[1]
    assert torch.equal(seq[:, :width], enc["input_ids"])
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for i in range(2):
        new = seq[i, width:].tolist()
        n = int(out.new_tokens[i])
        assert model.config.mask_token_id not in new[:n] and eos not in new[:n]
        if n < len(new):
            assert new[n] in (eos, pad) and all(t == pad for t in new[n + 1:])
        assert float(out.tokens_per_forward[i]) == pytest.approx(n / int(out.forwards[i]))
    plain = model.generate(**enc, max_new_tokens=16, **KW)
    assert torch.equal(plain, seq)


def test_left_padded_batch_rows_equal_single_runs(model):
    texts = ["what is two plus three ?", "the cat", "one two three four five six"]
    enc = _encode(model, texts)
    batch = model.generate(**enc, max_new_tokens=16, **KW)
    width = enc["input_ids"].shape[1]
    for i, text in enumerate(texts):
        alone_enc = _encode(model, [text])
        alone = model.generate(**alone_enc, max_new_tokens=16, **KW)
        got = batch[i, width:].tolist()
        want = alone[0, alone_enc["input_ids"].shape[1]:].tolist()
        assert got[: len(want)] == want


def test_generation_config_and_eos_override(model):
    enc = _encode(model, ["the dog"])
    base = model.generate(**enc, max_new_tokens=16, **KW)
    width = enc["input_ids"].shape[1]
    first = int(base[0, width])
    gc = GenerationConfig(max_new_tokens=16, eos_token_id=first, pad_token_id=0, do_sample=False)
    out = model.generate(**enc, generation_config=gc, **KW)
    assert out.shape[1] == width + 1 and int(out[0, width]) == first
    gc.return_dict_in_generate = True
    assert torch.equal(model.generate(**enc, generation_config=gc, **KW).sequences, out)


def test_checkpoint_generation_config_is_the_default(tiny_checkpoint, tmp_path):
    import json
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llada", seed=5), folder)
    plain = AutoD2FModel.from_pretrained(folder)
    assert plain.generation_config is None
    (folder / "generation_config.json").write_text(json.dumps(dict(max_new_tokens=16, **KW)))
    configured = AutoD2FModel.from_pretrained(folder)
    enc = _encode(plain, ["the dog and the cat"])
    want = plain.generate(**enc, max_new_tokens=16, **KW)
    assert torch.equal(configured.generate(**enc), want)
    assert not torch.equal(plain.generate(**enc, max_new_tokens=32), want)  # D2FConfig's defaults
    # An explicit argument still wins over the file.
    assert torch.equal(configured.generate(**enc, block_size=8),
                       plain.generate(**enc, max_new_tokens=16, **{**KW, "block_size": 8}))


def test_streamer_prints_the_returned_text(model):
    enc = _encode(model, ["the moon and the sun"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        out = model.generate(**enc, max_new_tokens=24, streamer=TextStreamer(model.tokenizer, skip_prompt=True,
                                                                              skip_special_tokens=True), **KW)
    text = model.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert buf.getvalue().strip() == text.strip() and text.strip()


def test_chat_template_prompt(model):
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "what is one plus one ?"}],
                                              add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=8, **KW)
    assert out.shape[0] == 1 and out.shape[1] > ids.shape[1]


@pytest.mark.parametrize("decoder", ["fast-dllm", "vanilla", "reference"])
def test_other_decoders(model, decoder):
    """Each decoder's generate gives the tokens that decoding.decode gives it, through the EOS."""
    enc = _encode(model, ["the bird"])
    kw = {"vanilla": dict(block_size=4), "fast-dllm": {**KW, "block_add_threshold": 1.0}}.get(decoder, KW)
    out = model.generate(**enc, max_new_tokens=8, decoder=decoder, return_dict_in_generate=True, **kw)
    prompt = enc["input_ids"][0].tolist()
    want = decode(model, [prompt], D2FConfig(max_new_tokens=8, **kw), decoder=decoder, eos_id=model.config.eos_token_id)
    row = want.tokens_before_eos(model.config.eos_token_id)[0]
    n = int(out.new_tokens[0])
    assert n == len(row) and out.sequences[0, len(prompt): len(prompt) + n].tolist() == row
    if decoder == "reference":
        d2f = model.generate(**enc, max_new_tokens=8, **KW)
        assert torch.equal(d2f, out.sequences)


@pytest.mark.parametrize("decoder", ["d2f", "reference"])
def test_max_new_tokens_between_whole_blocks_is_exact(model, decoder):
    """max_new_tokens 6 with blocks of 4: six tokens (the first six of an 8-token decode), not
    the one whole block the D2F loop's own max_new_tokens would give."""
    enc = _encode(model, ["one two"])
    no_eos = dict(eos_token_id=-1, **KW)
    six = model.generate(**enc, max_new_tokens=6, decoder=decoder, return_dict_in_generate=True, **no_eos)
    eight = model.generate(**enc, max_new_tokens=8, decoder=decoder, return_dict_in_generate=True, **no_eos)
    assert int(six.new_tokens[0]) == 6 and torch.equal(six.sequences, eight.sequences[:, :-2])


def test_engine_is_rebuilt_when_the_model_changes_dtype(tiny_checkpoint):
    model = AutoD2FModel.from_pretrained(tiny_checkpoint("llada", seed=5))
    enc = _encode(model, ["the cat"])
    model.generate(**enc, max_new_tokens=8, **KW)
    model.to(torch.bfloat16)
    model.generate(**enc, max_new_tokens=8, **KW)
    assert model.d2f_engine.cache.k.dtype == torch.bfloat16


def test_stop_strings_end_each_row_after_the_first_stop_string(model):
    enc = _encode(model, ["what is two plus three ?", "the cat"])
    width = enc["input_ids"].shape[1]
    tok = model.tokenizer
    full = model.generate(**enc, max_new_tokens=16, return_dict_in_generate=True, **KW)
    rows = [full.sequences[i, width:width + int(full.new_tokens[i])].tolist() for i in range(2)]
    # A word some row writes after its first token, before its end: cutting there shortens it.
    stop = next(tok.decode([t]).strip() for r in rows for t in r[1:-1] if t != r[0] and tok.decode([t]).strip())
    out = model.generate(**enc, max_new_tokens=16, return_dict_in_generate=True, stop_strings=[stop],
                         tokenizer=tok, **KW)
    cut = 0
    for i, row in enumerate(rows):
        # The shortest prefix whose text holds the stop string, found by trying every length.
        want = next((row[:n] for n in range(1, len(row) + 1) if stop in tok.decode(row[:n])), row)
        assert int(out.new_tokens[i]) == len(want)
        got = out.sequences[i, width:].tolist()
        assert got[:len(want)] == want
        if len(want) < len(row):  # cut: padding follows, no EOS
            cut += 1
            assert all(t == model.config.pad_token_id for t in got[len(want):])
    assert cut >= 1
    assert all(int(o) <= int(f) for o, f in zip(out.forwards, full.forwards))  # a stopped row stops
    for decoder in ("vanilla", "reference"):  # they run to the end, then cut the same way
        kw = dict(block_size=4) if decoder == "vanilla" else KW
        alone = model.generate(**enc, max_new_tokens=16, decoder=decoder, **kw)
        stopped = model.generate(**enc, max_new_tokens=16, decoder=decoder, stop_strings=stop, **kw)
        for i in range(2):
            row = alone[i, width:].tolist()
            n = next((n for n in range(1, len(row) + 1) if stop in tok.decode(row[:n], skip_special_tokens=True)),
                     None)
            if n is not None:
                assert stopped[i, width:width + n].tolist() == row[:n]


def test_stop_strings_need_a_tokenizer(tiny_checkpoint):
    bare = patch(load_model(tiny_checkpoint("llada", seed=5)))  # no tokenizer attached
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, stop_strings=["x"], **KW)


def test_bad_arguments(model):
    enc = _encode(model, ["the bird"])
    with pytest.raises(TypeError, match="nonsense"):
        model.generate(**enc, max_new_tokens=8, nonsense=1)
    with pytest.raises(ValueError, match="decoder"):
        model.generate(**enc, max_new_tokens=8, decoder="beam")
    with pytest.raises(ValueError, match="skip_threshold"):
        model.generate(**enc, max_new_tokens=8, skip_threshold=2.0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(enc["input_ids"][0], max_new_tokens=8)


def test_cli_end_to_end(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("dream", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nwhat is two plus two ?\n")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main(["--model", folder, "--file", str(prompts), "--max-new-tokens", "16", "--block-size", "4",
                         "--skip-threshold", "0.5"]) == 0
    assert len(out.getvalue().splitlines()) >= 2
    stats = err.getvalue()
    assert "new_tokens=" in stats and "forwards=" in stats and "tokens_per_s=" in stats


def test_sampling_only_with_do_sample(model):
    enc = _encode(model, ["the sun and the moon"])
    greedy = model.generate(**enc, max_new_tokens=16, **KW)
    ignored = model.generate(**enc, max_new_tokens=16, temperature=5.0, **KW)
    assert torch.equal(greedy, ignored)  # transformers semantics: no do_sample, no sampling
    a = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=5.0, seed=1, **KW)
    b = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=5.0, seed=1, **KW)
    c = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=5.0, seed=2, **KW)
    assert torch.equal(a, b) and not torch.equal(a, greedy) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = model.generate(**enc, max_new_tokens=16, do_sample=True, **KW)  # temperature 1, torch's RNG
    torch.manual_seed(3)
    e = model.generate(**enc, max_new_tokens=16, do_sample=True, **KW)
    assert torch.equal(d, e) and not torch.equal(d, greedy)


@pytest.mark.parametrize("decoder", ["reference", "vanilla"])
def test_streamer_with_non_streaming_decoders(model, decoder):
    enc = _encode(model, ["the moon and the sun"])
    buf = io.StringIO()
    kw = dict(block_size=4) if decoder == "vanilla" else KW
    with redirect_stdout(buf):
        out = model.generate(**enc, max_new_tokens=16, decoder=decoder, **kw,
                             streamer=TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True))
    text = model.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert buf.getvalue().strip() == text.strip() and text.strip()


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, tiny_checkpoint):
    for argv, needle in [(["--model", str(tmp_path / "missing")], "does not exist"),
                         (["--model", tiny_checkpoint("llada", seed=5), "--max-new-tokens", "0"], "max_new_tokens"),
                         (["--model", tiny_checkpoint("llada", seed=5), "--device", "nope"], "--device"),
                         (["--model", tiny_checkpoint("llada", seed=5), "--device", "cuda:7"], "--device cuda:7")]:
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            assert cli.main(argv) == 2
        assert "d2f-generate: error:" in err.getvalue() and needle in err.getvalue()



def test_cli_flags_the_decoder_does_not_read_are_refused(tmp_path, tiny_checkpoint, capsys):
    folder = tiny_checkpoint("llada", seed=5)
    for argv, needle in [(["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
                         (["--decoder", "vanilla", "--skip-threshold", "0.5"], "takes no --skip-threshold"),
                         (["--decoder", "vanilla", "--temperature", "0.7"], "takes no --temperature"),
                         (["--steps", "8"], "--steps is the vanilla decoder's setting")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["--model", folder, *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert cli.main(["--model", folder, "--file", str(blank)]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_generate_refuses_settings_the_decoder_does_not_read(model):
    enc = _encode(model, ["the bird"])
    with pytest.raises(ValueError, match="steps is vanilla decoding's setting"):
        model.generate(**enc, max_new_tokens=8, steps=8, **KW)
    for bad in (dict(skip_threshold=0.5), dict(sampling_strategy="neg_entropy"), dict(do_sample=True)):
        with pytest.raises(ValueError, match=f"takes no \\['{next(iter(bad))}'\\]"):
            model.generate(**enc, max_new_tokens=8, decoder="vanilla", block_size=4, **bad)
    # Greedy vanilla with its own settings still runs, as the checkpoint's thresholds do not count.
    out = model.generate(**enc, max_new_tokens=8, decoder="vanilla", block_size=4, steps=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8


def test_vanilla_refuses_sampling_settings(model):
    enc = _encode(model, ["the bird"])
    for name, value in (("temperature", 0.7), ("top_k", 5), ("top_p", 0.9), ("seed", 3)):
        with pytest.raises(ValueError, match=f"takes no \\['{name}'\\]"):
            model.generate(**enc, max_new_tokens=8, decoder="vanilla", block_size=4, **{name: value})


def test_fast_dllm_refuses_another_block_add_threshold(model):
    enc = _encode(model, ["the bird"])
    one_block = {**KW, "block_add_threshold": 1.0}
    with pytest.raises(ValueError, match="block_add_threshold=0.1"):
        model.generate(**enc, max_new_tokens=8, decoder="fast-dllm", **{**KW, "block_add_threshold": 0.1})
    fast = model.generate(**enc, max_new_tokens=8, decoder="fast-dllm", **one_block)
    assert torch.equal(fast, model.generate(**enc, max_new_tokens=8, **one_block))
    # Without do_sample the sampling settings stay ignored, as in transformers.
    assert torch.equal(model.generate(**enc, max_new_tokens=8, decoder="fast-dllm", temperature=5.0, **one_block),
                       fast)

# --- generate on the model's engine ----------------------------------------------------------

def test_second_generate_of_the_same_shapes_builds_nothing(model, monkeypatch):
    enc = _encode(model, ["the cat sat", "two plus two"])
    first = model.generate(**enc, max_new_tokens=16, **KW)
    engine = model.d2f_engine
    built = []
    monkeypatch.setattr(Engine, "__init__", lambda *a, **k: built.append("engine"))
    inner = KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a, **k: (built.append("cache"), inner(self, *a, **k)))
    cache_ptr = engine.cache.k.data_ptr()
    again = model.generate(**enc, max_new_tokens=16, **KW)
    assert built == [] and model.d2f_engine is engine and engine.cache.k.data_ptr() == cache_ptr
    assert torch.equal(first, again) and engine.graph_captures == 0


def test_max_new_tokens_below_the_block_size_decodes_one_short_block(model):
    enc = _encode(model, ["one two three"])
    out = model.generate(**enc, max_new_tokens=3, return_dict_in_generate=True, **KW)
    assert int(out.new_tokens[0]) <= 3 and out.sequences.shape[1] <= enc["input_ids"].shape[1] + 4
    ref = model.generate(**enc, max_new_tokens=3, decoder="reference", **KW)
    assert torch.equal(out.sequences, ref)


def test_max_length_counts_the_prompt(model):
    enc = _encode(model, ["one two three"])
    width = enc["input_ids"].shape[1]
    by_length = model.generate(**enc, max_length=width + 8, **KW)
    assert torch.equal(by_length, model.generate(**enc, max_new_tokens=8, **KW))
    with pytest.raises(ValueError, match="max_length"):
        model.generate(**enc, max_length=width, **KW)


def test_passed_generation_config_keeps_the_checkpoint_fields_it_does_not_set(model, monkeypatch):
    enc = _encode(model, ["the dog"])
    saved = GenerationConfig(block_size=4, block_add_threshold=0.25, decoded_token_threshold=0.9,
                             skip_threshold=0.5, max_new_tokens=12)
    monkeypatch.setattr(model, "generation_config", saved)
    merged = model.generate(**enc, generation_config=GenerationConfig(skip_threshold=0.3))
    explicit = model.generate(**enc, max_new_tokens=12, **{**KW, "skip_threshold": 0.3})
    assert torch.equal(merged, explicit)


def test_passed_generation_config_sets_fields_the_checkpoint_lacks(model, monkeypatch):
    enc = _encode(model, ["the dog and the cat"])
    # Like the shipped model's generation_config.json: no decoded_token_threshold.
    saved = GenerationConfig(block_size=4, block_add_threshold=0.25, skip_threshold=0.99, max_new_tokens=16)
    monkeypatch.setattr(model, "generation_config", saved)
    passed = model.generate(**enc, generation_config=GenerationConfig(decoded_token_threshold=0.5),
                            return_dict_in_generate=True)
    explicit = model.generate(**enc, decoded_token_threshold=0.5, return_dict_in_generate=True)
    default = model.generate(**enc, return_dict_in_generate=True)  # D2FConfig's 0.95
    assert torch.equal(passed.sequences, explicit.sequences) and torch.equal(passed.forwards, explicit.forwards)
    assert not torch.equal(passed.forwards, default.forwards)


def test_input_ids_must_be_integers(model):
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(torch.ones(1, 3), max_new_tokens=4, **KW)


def test_tokens_per_forward_does_not_count_the_eos(model):
    """A row that ends in EOS: new_tokens and tokens_per_forward count the tokens before it."""
    enc = _encode(model, ["the cat"])
    width = enc["input_ids"].shape[1]
    free = model.generate(**enc, max_new_tokens=16, **KW)[0, width:].tolist()
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k])
    out = model.generate(**enc, max_new_tokens=16, eos_token_id=free[k], return_dict_in_generate=True, **KW)
    row, n = out.sequences[0, width:].tolist(), int(out.new_tokens[0])
    assert n >= 2 and row[n] == free[k] and free[k] not in row[:n]
    assert float(out.tokens_per_forward[0]) == pytest.approx(n / int(out.forwards[0]))


def test_generate_after_d2f_decode_shares_its_engine(tiny_checkpoint):
    from d2f_ext import D2FConfig
    from d2f_ext.decoding import d2f_decode

    fresh = AutoD2FModel.from_pretrained(tiny_checkpoint("llada", seed=5))
    dec = d2f_decode(fresh, [[5, 6, 7, 8]], D2FConfig(max_new_tokens=8, **KW))
    engine = fresh.d2f_engine
    out = fresh.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, return_dict_in_generate=True, **KW)
    assert fresh.d2f_engine is engine
    n = int(out.new_tokens[0])
    assert out.sequences[0, 4:4 + n].tolist() == dec.tokens_before_eos(fresh.config.eos_token_id)[0]


class _Interrupting:
    """A streamer whose user presses Ctrl-C at the first generated tokens."""

    def put(self, value):
        if getattr(self, "prompt_seen", False):
            raise KeyboardInterrupt
        self.prompt_seen = True

    def end(self):
        pass


def test_streamer_prints_only_its_own_calls_tokens(model):
    from d2f_ext import D2FConfig

    with pytest.raises(KeyboardInterrupt):
        model.generate(**_encode(model, ["one two three four five six"]), max_new_tokens=32, streamer=_Interrupting(),
                       **KW)
    engine = model.d2f_engine
    # A request another caller of the shared engine left decoding (the engine API's, or one that
    # an interrupted call left behind) decodes beside the next call's.
    other = engine.add_request([5, 6, 7, 8, 9, 10], D2FConfig(max_new_tokens=32, **KW))
    enc = _encode(model, ["the moon"])
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            out = model.generate(**enc, max_new_tokens=16, **KW,
                                 streamer=TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True))
    finally:
        engine.abort(other)
    assert model.d2f_engine is engine and other.output  # it decoded during the call
    text = model.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert buf.getvalue().strip() == text.strip() and text.strip()


@pytest.fixture(scope="module")
def varied(tiny_checkpoint):
    """A tiny model whose outputs change token within the first blocks."""
    return AutoD2FModel.from_pretrained(tiny_checkpoint("dream", seed=3))


DECODER_SETTINGS = {"d2f": KW, "reference": KW, "fast-dllm": dict(block_size=4, skip_threshold=0.5),
                    "vanilla": dict(block_size=4)}


@pytest.mark.parametrize("decoder", sorted(DECODER_SETTINGS))
def test_a_list_of_eos_ids_ends_rows_at_any_of_them(varied, decoder):
    """transformers' list eos_token_id: a row ends at the first of any, which it keeps."""
    prompt, kw = torch.tensor([[5, 6, 7, 8, 9]]), DECODER_SETTINGS[decoder]
    full = varied.generate(prompt, max_new_tokens=16, decoder=decoder, eos_token_id=-1, **kw)[0, 5:].tolist()
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    got = varied.generate(prompt, max_new_tokens=16, decoder=decoder, eos_token_id=[-1, full[k]],
                          return_dict_in_generate=True, **kw)
    assert got.sequences[0, 5:].tolist() == full[:k + 1] and int(got.new_tokens[0]) == k
    with pytest.raises(ValueError, match="eos_token_id must be a token id or a list of them"):
        varied.generate(prompt, max_new_tokens=16, decoder=decoder, eos_token_id=[full[k], "x"], **kw)
