"""D2F on the kernels against the plain-PyTorch reference loop, batching, EOS and bad input."""

import random

import pytest
import torch

from d2f_ext import D2FConfig, ops, reference
from d2f_ext import layout as L
from d2f_ext.decoding import d2f_decode, decode, reference_decode, vanilla_decode
from d2f_ext.engine import Engine, EngineConfig, _localise
from d2f_ext.models import load_model


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tiny_checkpoint):
    return load_model(tiny_checkpoint(request.param, seed=3))


def _prompts(model, n, seed):
    rng = random.Random(seed)
    vocab = [t for t in range(model.config.vocab_size)
             if t not in (model.config.mask_token_id, model.config.eos_token_id)]
    return [[rng.choice(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


CONFIGS = [
    D2FConfig(block_size=4, block_add_threshold=0.25, decoded_token_threshold=0.9, skip_threshold=0.9, max_new_tokens=24),
    D2FConfig(block_size=8, block_add_threshold=0.1, decoded_token_threshold=0.95, skip_threshold=0.9,
              sampling_strategy="margin_confidence", max_new_tokens=32),
    D2FConfig(block_size=5, block_add_threshold=0.2, decoded_token_threshold=0.6, skip_threshold=0.7,
              sampling_strategy="neg_entropy", max_new_tokens=27),
    D2FConfig.fast_dllm(block_size=4, skip_threshold=0.9, max_new_tokens=16),
]


class UnmaskSpy:
    """Wraps ops.unmask to record which of the spec's decode rules fired."""

    def __init__(self, monkeypatch):
        self.threshold = self.forced = self.pipelined = 0
        self.inner = ops.unmask
        monkeypatch.setattr(ops, "unmask", self)

    def __call__(self, logits, tokens, block_ids, fully_activated, mask_id, **kw):
        rows = logits if kw.get("prev_logits") is None else torch.cat([kw["prev_logits"][:, None], logits[:, :-1]], 1)
        _, p, _ = reference.token_stats(rows, 0.0, 0, mask_id=mask_id)
        masked = (tokens == mask_id) & (block_ids >= 0)
        over = masked & (p > torch.tensor(kw["skip_threshold"], dtype=torch.float32))
        counts, eos = self.inner(logits, tokens, block_ids, fully_activated, mask_id, **kw)
        for b in range(tokens.shape[0]):
            blocks = torch.unique(block_ids[b][masked[b]]).tolist()
            self.pipelined += len(blocks) >= 2  # a block started before the previous one finished
            for k in blocks:
                in_k = block_ids[b] == k
                self.threshold += bool((over[b] & in_k).any())
                self.forced += int(counts[b, k]) == 1 and not bool((over[b] & in_k).any())
        return counts, eos


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"bs{c.block_size}-add{c.block_add_threshold}-{c.sampling_strategy}")
def test_kernel_path_equals_reference_loop(model, cfg, monkeypatch):
    prompts = _prompts(model, 3, seed=cfg.block_size)
    spy = UnmaskSpy(monkeypatch)
    got = d2f_decode(model, prompts, cfg)
    want = reference_decode(model, prompts, cfg)
    eos = model.config.eos_token_id
    assert got.tokens_before_eos(eos) == want.tokens_before_eos(eos)
    assert got.forwards.tolist() == want.forwards.tolist()
    assert spy.threshold > 0 and spy.forced > 0
    if cfg.block_add_threshold < 1:
        assert spy.pipelined > 0


def test_batch_rows_equal_single_rows(model):
    cfg = CONFIGS[0]
    prompts = _prompts(model, 4, seed=11)
    batch = d2f_decode(model, prompts, cfg)
    for i, p in enumerate(prompts):
        alone = d2f_decode(model, [p], cfg)
        assert batch.generated[i].tolist() == alone.generated[0].tolist()
        assert int(batch.forwards[i]) == int(alone.forwards[0])


def test_sampling_kernel_path_equals_reference_loop(model):
    cfg = D2FConfig(block_size=4, block_add_threshold=0.5, skip_threshold=0.5, max_new_tokens=16,
                    temperature=0.8, top_k=20, top_p=0.95, seed=5)
    prompt = _prompts(model, 1, seed=2)
    got, want = d2f_decode(model, prompt, cfg), reference_decode(model, prompt, cfg)
    assert got.generated.tolist() == want.generated.tolist()
    other = d2f_decode(model, prompt, D2FConfig(**{**cfg.__dict__, "seed": 6}))
    assert other.generated.tolist() != got.generated.tolist()


def test_eos_stops_new_blocks_and_ends_the_row(model):
    """An EOS id that the model decodes early: the row stops adding blocks, and finishes as soon
    as everything before the EOS is decoded."""
    cfg = CONFIGS[0]
    prompt = _prompts(model, 1, seed=4)
    free = d2f_decode(model, prompt, cfg, eos_id=-1)
    first = int(free.generated[0, 0])
    out = d2f_decode(model, prompt, cfg, eos_id=first)
    ref = reference_decode(model, prompt, cfg, eos_id=first)
    assert out.tokens_before_eos(first) == ref.tokens_before_eos(first) == [[]]
    assert out.forwards.tolist() == ref.forwards.tolist()
    assert int(out.forwards[0]) <= int(free.forwards[0])
    blocks_decoded = (out.generated[0] != model.config.mask_token_id).sum().item()
    assert blocks_decoded < free.generated.shape[1]


@pytest.mark.parametrize("bad, match", [
    ([[1, 2, None]], "mask token"),
    ([[]], "empty"),
    ([[10 ** 7]], "vocabulary"),
    ([[1] * 600], "context"),
])
def test_bad_prompts(model, bad, match):
    if bad[0] and bad[0][-1] is None:
        bad = [[1, 2, model.config.mask_token_id]]
    with pytest.raises(ValueError, match=match):
        d2f_decode(model, bad, CONFIGS[0])


@pytest.mark.parametrize("kwargs, name", [
    (dict(block_size=0), "block_size"), (dict(skip_threshold=1.5), "skip_threshold"),
    (dict(block_add_threshold=-0.1), "block_add_threshold"),
    (dict(decoded_token_threshold=2.0), "decoded_token_threshold"),
    (dict(sampling_strategy="nope"), "sampling_strategy"), (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(seed=1.5), "seed"), (dict(seed=-1), "seed"), (dict(seed=None), "seed"),
    # True is an int to Python; a string is no number: each named, not a bare TypeError
    (dict(block_size=True), "block_size"), (dict(max_new_tokens=True), "max_new_tokens"), (dict(top_k=True), "top_k"),
    (dict(temperature="0.7"), "temperature"), (dict(top_p="0.9"), "top_p"), (dict(skip_threshold=True), "skip_threshold"),
])
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        D2FConfig(**kwargs)


def test_vanilla_decodes_every_position_in_fixed_steps(model):
    prompts = _prompts(model, 2, seed=9)
    out = vanilla_decode(model, prompts, max_new_tokens=16, block_size=8, steps=8)
    assert not (out.generated == model.config.mask_token_id).any()
    assert out.forwards.tolist() == [8, 8]
    alone = vanilla_decode(model, prompts[1:], max_new_tokens=16, block_size=8, steps=8)
    assert alone.generated[0].tolist() == out.generated[1].tolist()
    with pytest.raises(ValueError, match="steps"):
        vanilla_decode(model, prompts, max_new_tokens=16, block_size=8, steps=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vanilla_decode(model, prompts, max_new_tokens=0, block_size=8, steps=8)
    cfg = D2FConfig(block_size=8, max_new_tokens=16)
    assert decode(model, prompts, cfg, decoder="vanilla", steps=8).generated.tolist() == out.generated.tolist()
    for decoder in ("d2f", "fast-dllm", "reference"):  # steps would be ignored there: refused
        with pytest.raises(ValueError, match="steps is vanilla decoding's setting"):
            decode(model, prompts, cfg, decoder=decoder, steps=8)


def test_finished_rows_leave_the_batch(model, monkeypatch):
    """A row that finished costs no compute: later forwards run over the live rows only."""
    cfg = CONFIGS[0]
    prompts = _prompts(model, 3, seed=21)
    batch_sizes = []
    inner = model.window_hidden

    def spy(input_ids, *a, **kw):
        batch_sizes.append(input_ids.shape[0])
        return inner(input_ids, *a, **kw)

    monkeypatch.setattr(model, "window_hidden", spy)
    out = d2f_decode(model, prompts, cfg)
    assert len(batch_sizes) == int(out.forwards.max())
    for step, size in enumerate(batch_sizes):
        assert size == int((out.forwards > step).sum())


def test_model_that_predicts_the_mask_token_still_finishes(tiny_checkpoint):
    """A head that ranks [MASK] first (here: a scaled copy of a frequent token's row) must not
    stall the pipeline: decoding ends, no mask id is returned, both paths agree."""
    model = load_model(tiny_checkpoint("llada", seed=3))
    mask = model.config.mask_token_id
    prompts = _prompts(model, 3, seed=8)
    probe = torch.tensor([prompts[0] + [mask] * 8])
    favourite = int(model(probe)[0, -8:].argmax(-1).mode().values)
    head = model.model.transformer.ff_out.weight
    with torch.no_grad():
        head[mask] = 1.3 * head[favourite]
    assert (model(probe)[0, -8:].argmax(-1) == mask).any()
    cfg = CONFIGS[0]
    got, want = d2f_decode(model, prompts, cfg), reference_decode(model, prompts, cfg)
    assert got.generated.tolist() == want.generated.tolist()
    assert got.forwards.tolist() == want.forwards.tolist()
    assert not (got.generated == mask).any()


@pytest.mark.parametrize("sync_every", [1, 3])
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"bs{c.block_size}-add{c.block_add_threshold}")
def test_static_steps_equal_compact_steps(model, cfg, sync_every):
    """Fixed shapes (every row, a window wide enough for sync_every steps, finished rows all
    padding) decode exactly what the compact batch does, EOS included."""
    prompts = _prompts(model, 4, seed=31 + cfg.block_size)
    for eos in (None, -1):
        compact = d2f_decode(model, prompts, cfg, eos_id=eos, static=False)
        static = d2f_decode(model, prompts, cfg, eos_id=eos, static=True, sync_every=sync_every)
        assert static.generated.tolist() == compact.generated.tolist()
        assert static.forwards.tolist() == compact.forwards.tolist()
    first = int(compact.generated[1, 0])  # an EOS that row 1 decodes first
    compact = d2f_decode(model, prompts, cfg, eos_id=first, static=False)
    static = d2f_decode(model, prompts, cfg, eos_id=first, static=True, sync_every=sync_every)
    assert static.tokens_before_eos(first) == compact.tokens_before_eos(first)
    assert static.forwards.tolist() == compact.forwards.tolist()


def test_static_steps_run_fixed_shapes(model, monkeypatch):
    """Between host syncs every forward has the whole batch and one window width, a multiple of
    the block size after the first forward."""
    cfg = CONFIGS[0]
    prompts = _prompts(model, 3, seed=41)
    shapes = []
    inner = model.window_hidden

    def spy(input_ids, *a, **kw):
        shapes.append(tuple(input_ids.shape))
        return inner(input_ids, *a, **kw)

    monkeypatch.setattr(model, "window_hidden", spy)
    out = d2f_decode(model, prompts, cfg, static=True, sync_every=4)
    rows = model.d2f_engine.config.max_batch  # every row of the engine, free ones included
    assert rows >= 3 and shapes[0] == (rows, max(map(len, prompts)) + cfg.block_size)
    widths = [w for _, w in shapes[1:]]
    assert all(b == rows for b, _ in shapes) and all(w % cfg.block_size == 0 for w in widths)
    for i in range(0, len(widths), 4):
        assert len(set(widths[i:i + 4])) == 1
    assert len(shapes) >= int(out.forwards.max())


@pytest.mark.cuda
def test_cuda_graph_steps_equal_compact_steps(tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for arch in ("llada", "dream"):
        model = load_model(tiny_checkpoint(arch, seed=3), device="cuda")
        prompts = _prompts(model, 4, seed=7)
        for cfg in CONFIGS[:3]:
            compact = d2f_decode(model, prompts, cfg, static=False)
            graphed = d2f_decode(model, prompts, cfg, static=True, cuda_graphs=True, sync_every=3)
            assert graphed.generated.tolist() == compact.generated.tolist()
            assert graphed.forwards.tolist() == compact.forwards.tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_eager_static_step_never_syncs(tiny_checkpoint, arch):
    """A whole fixed-shape D2F step (forward, unmask, pipeline_step), run eagerly with the ops'
    debug checks off, never makes the host wait for the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = load_model(tiny_checkpoint(arch, seed=3), device="cuda")
    cfg = CONFIGS[0]
    engine = Engine(model, EngineConfig(max_batch=3, max_len=64, block_size=cfg.block_size, static=True,
                                        cuda_graphs=False))
    live = [engine.add_request(p, cfg) for p in _prompts(model, 3, seed=5)]
    engine.step()  # admission and the prompts' step (host reads allowed); initialises what is lazy
    live = [r for r in live if not r.finished]
    unmask_groups, pipeline_groups = (_localise(g, {r.slot: r.slot for r in live}, 3, engine.device)
                                      for g in engine._groups(live))
    forwards = engine.rows[:, L.FORWARDS].clone()
    previous = ops.set_debug_checks(False)
    try:
        with torch.inference_mode():  # as the engine runs its steps
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:  # a fixed-shape step as the engine runs it between host syncs
                engine._forward(None, engine.max_len, engine.max_len, unmask_groups, pipeline_groups)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        ops.set_debug_checks(previous)
    torch.cuda.synchronize()
    assert bool((engine.rows[:, L.FORWARDS] > forwards).any())


@pytest.mark.parametrize("kwargs, match", [
    (dict(sync_every=0), "sync_every"),
    (dict(static=True, cuda_graphs=True), "cuda_graphs"),
])
def test_bad_step_driving(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        d2f_decode(model, _prompts(model, 1, seed=0), CONFIGS[0], **kwargs)
