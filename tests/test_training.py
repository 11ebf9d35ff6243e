"""Training smoke tests: the math task, the tokenizer, the distillation's masks and weights, and
a few steps of each training loop (the loss must fall), on tiny models."""

import json
import math
import os
import re
import shutil
import statistics
import types

import pytest
import torch

from d2f_ext import AutoD2FModel
from d2f_ext.models import load_adapter, load_model
from d2f_recipe import adapt_ar, distill, task_math, tokenizer_math, train_ar, train_teacher
from d2f_recipe import training as tc

TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--batch", "8", "--train-size", "200",
        "--warmup", "3"]


def fell(losses, k=5, factor=0.8):
    return statistics.mean(losses[-k:]) < factor * statistics.mean(losses[:k])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(folder, losses) of a tiny teacher trained for a few steps."""
    out = str(tmp_path_factory.mktemp("teacher"))
    losses = train_teacher.main(["--out", out, "--steps", "30", "--lr", "3e-3", *TINY])
    return out, losses


# --- the math task ---------------------------------------------------------------------------

@pytest.mark.parametrize("level", task_math.LEVELS)
def test_answers_parse_and_match(level):
    for p in task_math.problems("train", 400, seed=3, level=level):
        n = len(task_math.STEP_RE.findall(p.solution))
        assert n >= 2 and task_math.steps_right(p.solution) == (n, n)
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert task_math.answer_of(p.solution) == p.answer
        assert p.answer >= 0
        # steps_right divides with floor, so an uneven division would pass the checks above.
        assert all(int(x) % int(y) == 0 for x, op, y, _ in task_math.STEP_RE.findall(p.solution) if op == "/")
    assert task_math.answer_of("no answer here") is None
    assert task_math.answer_of("so The answer is 12 and The answer is 7") == 12


def test_small_level_draws_small_numbers():
    import re

    def numbers(ps):
        return [int(x) for p in ps for x in re.findall(r"\d+", p.question + p.solution)]

    small = numbers(task_math.problems("train", 2000, seed=0, level="small"))
    gsm = numbers(task_math.problems("train", 2000, seed=0))
    assert max(small) <= 9 * 9 + 20 and max(gsm) > 300
    assert task_math.problems("test", 50, seed=0) == task_math.problems("test", 50, seed=0, level="gsm")
    with pytest.raises(ValueError, match="level"):
        task_math.problems("test", 5, level="hard")


def test_split_disjoint_and_deterministic():
    train = task_math.problems("train", 3000, seed=1)
    test = task_math.problems("test", 300, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.question for p in train}) == 3000
    assert task_math.problems("test", 300, seed=1) == test
    assert task_math.problems("test", 300, seed=2) != test
    # Disjoint whatever the seeds: a test question of one seed is never a train one of another.
    assert not {p.question for p in task_math.problems("train", 3000, seed=2)} & {p.question for p in test}


def test_steps_right_checks_each_written_step():
    p = task_math.problems("test", 1, seed=0)[0]
    n = len(task_math.STEP_RE.findall(p.solution))
    assert n >= 2 and task_math.steps_right(p.solution) == (n, n)
    assert task_math.steps_right("12 + 5 = 17. 17 * 3 = 50. 8 / 0 = 0. The answer is 50.") == (1, 3)
    assert task_math.steps_right("no arithmetic here") == (0, 0)


def test_tokenizer_ids_in_config_and_exact_decode(teacher):
    from transformers import AutoTokenizer

    folder, _ = teacher
    tok = AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == \
        (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len({tok.mask_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert cfg["model_type"] == "llada" and cfg["embedding_size"] == len(tok)
    for p in task_math.problems("test", 50, seed=0):
        ids = tok(p.solution, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == p.solution
        assert task_math.answer_of(tok.decode(ids)) == p.answer
        chat = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                       add_generation_prompt=True)
        assert chat == task_math.format_prompt(p.question)


# --- masks, noise and loss weights -----------------------------------------------------------

def test_block_ratios_bounds_and_order():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5):
        t = distill.block_ratios(4000, n, g)
        assert t.shape == (4000, n)
        assert (t >= 0.2).all() and (t <= 0.7).all()
        assert (t[:, 1:] >= t[:, :-1]).all()
        # t_1 spans U[0.2, 0.7] rather than sitting at one value.
        assert t[:, 0].min() < 0.22 and t[:, 0].max() > 0.68
    assert (t[:, -1] > t[:, 0] + 0.05).float().mean() > 0.3  # later blocks do get more masking


def _batch(prompt_lens, resp_lens, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randint(2, vocab, (p,), generator=g).tolist(), torch.randint(2, vocab, (r,), generator=g).tolist())
             for p, r in zip(prompt_lens, resp_lens)]
    return tc.collate(pairs, pad_id=0)


def test_student_block_ids():
    b = _batch([3, 5], [33, 16])
    ids = distill.student_block_ids(b, 16)
    assert ids[0].tolist() == [0] * 3 + [1] * 16 + [2] * 16 + [3]
    assert ids[1].tolist() == [0] * 5 + [1] * 16 + [-1] * 15
    assert distill.teacher_block_ids(b)[1].tolist() == [0] * 21 + [-1] * 15


def test_noise_batch_masks_response_only_with_block_ratio():
    b = _batch([7] * 300 + [4] * 300, [64] * 300 + [50] * 300)
    g = torch.Generator().manual_seed(11)
    noised, masked, ratio, blocks = distill.noise_batch(b, 16, mask_id=1, gen=g)
    resp = b.response()
    assert not masked[~resp].any()  # prompt and padding never masked
    assert torch.equal(noised, torch.where(masked, 1, b.ids))
    # The ratio of each position is its block's, from block_ratios drawn by the same generator.
    expect = distill.block_ratios(600, 4, torch.Generator().manual_seed(11))
    for row in (0, 450):
        for pos in torch.nonzero(resp[row]).flatten().tolist():
            assert ratio[row, pos] == expect[row, blocks[row, pos] - 1]
    assert (ratio[~resp] == 0).all()
    # Each position masked with its ratio: per block, the masked fraction matches the mean ratio.
    for k in range(1, 5):
        sel = resp & (blocks == k)
        assert abs(masked[sel].float().mean() - ratio[sel].mean()) < 0.02


def test_distill_loss_is_weighted_kl_on_masked_positions():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 12, 9
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    ratio = 0.2 + 0.5 * torch.rand(B, L, generator=g)
    want, n = 0.0, 0
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                pt = torch.softmax(t[b, i], -1)
                want += float((pt * (pt.log() - torch.log_softmax(s[b, i], -1))).sum()) / float(ratio[b, i])
                n += 1
    assert distill.distill_loss(s, t, masked, ratio, False).item() == pytest.approx(want / n, rel=1e-5)
    # Unmasked positions do not count.
    s2 = s.clone()
    s2[~masked] = torch.randn(int((~masked).sum()), V)
    assert distill.distill_loss(s2, t, masked, ratio, False) == pytest.approx(want / n, rel=1e-5)
    # Dream: position p is judged on the logits output at p - 1, for teacher and student alike.
    shifted = distill.distill_loss(s, t, masked, ratio, True)
    manual = distill.distill_loss(tc.shift_logits(s), tc.shift_logits(t), masked, ratio, False)
    assert shifted.item() == pytest.approx(manual.item(), rel=1e-6)
    # Gradient equals that of the cross-entropy against the teacher's softmax.
    s.requires_grad_(True)
    distill.distill_loss(s, t, masked, ratio, False).backward()
    s_ce = s.detach().clone().requires_grad_(True)
    ce = -(torch.softmax(t, -1) * torch.log_softmax(s_ce, -1)).sum(-1)
    ((ce / ratio)[masked].sum() / masked.sum()).backward()
    torch.testing.assert_close(s.grad, s_ce.grad)


def test_distill_loss_data_weight_adds_the_weighted_cross_entropy_on_the_data():
    g = torch.Generator().manual_seed(1)
    B, L, V = 2, 10, 7
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    ratio = 0.2 + 0.5 * torch.rand(B, L, generator=g)
    ce = torch.nn.functional.cross_entropy(s.view(-1, V), targets.view(-1), reduction="none").view(B, L)
    extra = float((ce / ratio)[masked].sum() / masked.sum())
    kl = distill.distill_loss(s, t, masked, ratio, False).item()
    assert distill.distill_loss(s, t, masked, ratio, False, targets, 0.5).item() == \
        pytest.approx(kl + 0.5 * extra, rel=1e-5)
    # Dream: the target at p is scored on the logits output at p - 1.
    shifted = distill.distill_loss(s, t, masked, ratio, True, targets, 2.0)
    manual = distill.distill_loss(tc.shift_logits(s), tc.shift_logits(t), masked, ratio, False, targets, 2.0)
    assert shifted.item() == pytest.approx(manual.item(), rel=1e-6)


class _FixedLogits(torch.nn.Module):
    """Logits a fixed function of the input ids; records what it was given."""

    def __init__(self, V):
        super().__init__()
        self.config = types.SimpleNamespace(logit_shift=False)
        self.table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(1))
        self.seen = None

    def forward(self, ids, block_ids):
        self.seen, self.block_ids = ids.clone(), block_ids.clone()
        return self.table[ids]


@pytest.mark.parametrize("weighting", train_teacher.WEIGHTINGS)
def test_teacher_loss_weighting(weighting):
    V, mask_id, eps = 7, 7, 1e-3
    g = torch.Generator().manual_seed(0)
    batch = tc.collate([([1, 2, 3], [4, 5, 6, 0, 0]), ([2, 2], [6, 1, 0]), ([3], [1, 2, 3, 4, 5, 6])], pad_id=0)
    model = _FixedLogits(V)
    seed = 5
    got = train_teacher.diffusion_loss(model, batch, mask_id, eps, torch.Generator().manual_seed(seed), weighting)
    masked = model.seen == mask_id
    assert not (masked & ~batch.response()).any() and masked.any()
    assert torch.equal(model.seen[~masked], batch.ids[~masked])
    ce = torch.nn.functional.cross_entropy(model.table[model.seen][masked], batch.ids[masked], reduction="none")
    if weighting == "tokens":
        want = ce.mean()
    else:  # LLaDA's: per sequence, sum of CE / ratio over its response length; mean over the batch
        ratio = (1 - eps) * torch.rand(3, generator=torch.Generator().manual_seed(seed)) + eps
        per_pos = torch.zeros(batch.ids.shape)
        per_pos[masked] = ce
        want = ((per_pos.sum(1) / ratio) / batch.response().sum(1)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        train_teacher.diffusion_loss(model, batch, mask_id, eps, g, "uniform")


def test_semi_ar_masks_leave_a_clean_prefix_one_partial_block_and_a_masked_suffix():
    batch = tc.collate([([1, 2], [3] * 40), ([1, 2, 3, 4, 5], [6] * 30)], pad_id=0)
    resp = batch.response()
    cuts = set()
    for seed in range(100):
        # ratio 1 masks the whole block, ratio 0 none of it: the same cut, drawn first, shows in both
        full, full_scored = train_teacher.semi_ar_masks(batch, torch.ones(2), 8, torch.Generator().manual_seed(seed))
        none, none_scored = train_teacher.semi_ar_masks(batch, torch.zeros(2), 8, torch.Generator().manual_seed(seed))
        assert not (full & ~resp).any() and not none_scored.any()
        for b in range(2):
            row, n = full[b][resp[b]], int(resp[b].sum())
            cut = int(row.nonzero()[0])
            cuts.add((b, cut))
            assert row[cut:].all() and not row[:cut].any()
            assert full_scored[b][resp[b]].nonzero().flatten().tolist() == list(range(cut, min(cut + 8, n)))
            assert none[b][resp[b]].nonzero().flatten().tolist() == list(range(cut + 8, n))
    assert len({c for b, c in cuts if b == 0}) > 20  # the cut ranges over the response


def test_ar_share_rows_are_clean_causal_and_scored_as_next_token():
    torch.manual_seed(0)
    batch = tc.collate([([1, 2, 3], [4, 5, 6, 0, 0]), ([2, 2], [6, 1, 0])] * 8, pad_id=0)
    model = _FixedLogits(7)
    model.config.logit_shift = True
    loss = train_teacher.diffusion_loss(model, batch, 7, 1e-3, torch.Generator().manual_seed(3), ar_share=0.5)
    causal = torch.where(batch.real(), batch.positions(), -1).to(torch.int32)
    ar = (model.block_ids == causal).all(1)
    assert 0 < ar.sum() < len(ar) and not (model.seen[ar] == 7).any()
    assert (model.block_ids[~ar] == torch.where(batch.real(), 0, -1)[~ar]).all()
    logits = tc.shift_logits(model.table[model.seen])
    resp, masked = batch.response(), model.seen == 7
    want = torch.nn.functional.cross_entropy(logits[resp & ar[:, None]], batch.ids[resp & ar[:, None]]) + \
        torch.nn.functional.cross_entropy(logits[masked], batch.ids[masked])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    model.config.logit_shift = False
    with pytest.raises(ValueError, match="logit_shift"):
        train_teacher.diffusion_loss(model, batch, 7, 1e-3, torch.Generator(), ar_share=0.5)


def test_semi_ar_share_switches_whole_examples():
    batch = tc.collate([([1, 2], [3] * 40)] * 64, pad_id=0)
    model = _FixedLogits(7)
    train_teacher.diffusion_loss(model, batch, 7, 1e-3, torch.Generator().manual_seed(0), semi_ar_share=1.0,
                                 block_size=4)
    masked = (model.seen == 7)[:, 2:]
    # a semi-AR row: once 4 positions past its first mask, every position is masked
    for row in masked:
        first = int(row.nonzero()[0]) if row.any() else 40
        assert row[first + 4:].all()
    train_teacher.diffusion_loss(model, batch, 7, 1e-3, torch.Generator().manual_seed(0))
    uniform = (model.seen == 7)[:, 2:]
    assert any(not r[int(r.nonzero()[0]) + 4:].all() for r in uniform if r.any())


def _lora_distiller(folder):
    d = distill.Distiller(load_model(folder), full_finetune=False)
    with torch.no_grad():  # a non-zero adapter, so that student and teacher differ
        for name, p in d.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    d.peft.eval()  # no LoRA dropout, so that forwards are repeatable
    return d


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_student_block_causal_teacher_global(arch, tiny_checkpoint):
    folder = tiny_checkpoint(arch, vocab=64, hidden_size=32, num_layers=2, intermediate_size=64, shards=1)
    d = _lora_distiller(folder)
    b = _batch([5], [48], vocab=40, seed=4)
    blocks = distill.student_block_ids(b, 16)
    later = b.ids.clone()
    later[0, 5 + 32:] = torch.randint(2, 40, (16,))  # change block 3 only
    with torch.no_grad():
        s1, s2 = d.student_logits(b.ids, blocks), d.student_logits(later, blocks)
    t1, t2 = d.teacher_logits(b.ids, b), d.teacher_logits(later, b)
    upto = 5 + 32
    torch.testing.assert_close(s1[:, :upto], s2[:, :upto], rtol=0, atol=1e-6)
    assert (s1[:, upto:] - s2[:, upto:]).abs().max() > 1e-3
    assert (t1[:, :upto] - t2[:, :upto]).abs().max() > 1e-3  # the teacher sees later blocks
    # Inside a block the student is bidirectional: block 1 sees a change at its end.
    inside = b.ids.clone()
    inside[0, 5 + 15] = (inside[0, 5 + 15] + 1) % 40
    with torch.no_grad():
        s3 = d.student_logits(inside, blocks)
    assert (s1[:, 5:5 + 15] - s3[:, 5:5 + 15]).abs().max() > 1e-4
    torch.testing.assert_close(s1[:, :5], s3[:, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_teacher_is_base_model_without_grad(arch, tiny_checkpoint):
    folder = tiny_checkpoint(arch, vocab=64, hidden_size=32, num_layers=2, intermediate_size=64, shards=1)
    d = _lora_distiller(folder)
    b = _batch([4, 6], [20, 32], vocab=40)
    t = d.teacher_logits(b.ids, b)
    assert not t.requires_grad
    base = load_model(folder)(b.ids, block_ids=distill.teacher_block_ids(b))
    real = b.real()
    torch.testing.assert_close(t[real], base[real].detach())
    # Without padding the teacher's view is exactly no mask at all.
    torch.testing.assert_close(t[1], load_model(folder)(b.ids[1:]).detach()[0])
    s = d.student_logits(b.ids, distill.teacher_block_ids(b))
    assert s.requires_grad and (s - t).abs().max() > 1e-3  # the adapter is on for the student


def test_full_finetune_teacher_is_frozen_copy(tiny_checkpoint):
    folder = tiny_checkpoint("llada", vocab=64, hidden_size=32, num_layers=2, intermediate_size=64, shards=1)
    d = distill.Distiller(load_model(folder), full_finetune=True)
    b = _batch([4], [32], vocab=40)
    before = d.teacher_logits(b.ids, b)
    opt = torch.optim.SGD(d.student.parameters(), lr=1.0)
    d.loss(b, 16, torch.Generator().manual_seed(0)).backward()
    opt.step()
    torch.testing.assert_close(d.teacher_logits(b.ids, b), before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in d.teacher.parameters())


def test_distiller_data_weight_scores_the_batch_own_tokens(tiny_checkpoint):
    folder = tiny_checkpoint("llada", vocab=64, hidden_size=32, num_layers=2, intermediate_size=64, shards=1)
    b = _batch([4, 6], [32, 20], vocab=40)
    plain = distill.Distiller(load_model(folder), full_finetune=True)
    weighted = distill.Distiller(load_model(folder), full_finetune=True, data_weight=0.5)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    extra = weighted.loss(b, 16, gen()) - plain.loss(b, 16, gen())
    noised, masked, ratio, blocks = distill.noise_batch(b, 16, plain.config.mask_token_id, gen())
    s = plain.student_logits(noised, blocks).detach()
    ce = torch.nn.functional.cross_entropy(s[masked], b.ids[masked], reduction="none")
    assert masked.any() and float(extra.detach()) == pytest.approx(0.5 * float((ce / ratio[masked]).mean()), rel=1e-4)


# --- training loops --------------------------------------------------------------------------

def test_teacher_loss_falls_and_checkpoint_loads(teacher):
    folder, losses = teacher
    assert fell(losses), losses
    model = load_model(folder)
    assert model.config.arch == "llada" and model.config.hidden_size == 32


def test_teacher_resume_continues_the_same_run(tmp_path):
    # A warm-up longer than the run keeps the learning rate independent of --steps.
    args = ["--lr", "1e-3", *TINY, "--warmup", "100", "--save-every", "4"]
    whole = train_teacher.main(["--out", str(tmp_path / "a"), "--steps", "8", *args])
    first = train_teacher.main(["--out", str(tmp_path / "b"), "--steps", "4", *args])
    rest = train_teacher.main(["--out", str(tmp_path / "b"), "--steps", "8", "--resume", *args])
    assert len(rest) == 4
    assert first + rest == pytest.approx(whole, rel=1e-4)


def test_distill_lora_loss_falls_adapter_loads_and_merges(teacher, tmp_path):
    folder, _ = teacher
    out, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    losses = distill.main(["--teacher", folder, "--out", out, "--merge-to", merged, "--steps", "20",
                           "--batch", "8", "--train-size", "8", "--lr", "1e-2", "--warmup", "2"])
    assert fell(losses, factor=0.5), losses
    with open(os.path.join(out, "adapter_config.json")) as f:
        acfg = json.load(f)
    assert (acfg["r"], acfg["lora_alpha"], acfg["lora_dropout"]) == (32, 32, 0.1)
    assert sorted(acfg["target_modules"]) == sorted(distill.LORA_TARGETS["llada"])
    student = load_adapter(load_model(folder), out)
    ids = _batch([6], [32], vocab=40).ids
    base_logits = load_model(folder)(ids)
    assert (student(ids) - base_logits).abs().max() > 1e-4  # the adapter changed the model
    torch.testing.assert_close(load_model(merged)(ids), student(ids))


def test_distill_full_finetune_loss_falls(teacher, tmp_path):
    folder, _ = teacher
    out = str(tmp_path / "student")
    losses = distill.main(["--teacher", folder, "--out", out, "--full-finetune", "--steps", "20",
                           "--batch", "8", "--train-size", "8", "--lr", "3e-3", "--warmup", "2"])
    assert fell(losses, factor=0.5), losses
    assert load_model(out).config.mask_token_id == load_model(folder).config.mask_token_id
    # generate decodes the student as it was distilled: its block size, over the trained canvas.
    gc = AutoD2FModel.from_pretrained(out).generation_config
    assert (gc.block_size, gc.max_new_tokens) == (16, 64)


@pytest.fixture(scope="module")
def ar(teacher, tmp_path_factory):
    """(folder, losses) of a tiny AR baseline sharing the teacher's tokenizer."""
    out = str(tmp_path_factory.mktemp("ar"))
    losses = train_ar.main(["--out", out, "--tokenizer", teacher[0], "--steps", "40", "--lr", "3e-3", *TINY])
    return out, losses


def test_ar_loss_falls_and_loads(teacher, ar):
    from transformers import AutoModelForCausalLM

    folder, _ = teacher
    out, losses = ar
    assert fell(losses), losses
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)
    assert model.config.vocab_size == load_model(folder).config.vocab_size


def test_adapted_model_under_a_causal_mask_is_the_ar_model(ar):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = ar
    mask = AutoTokenizer.from_pretrained(folder).mask_token_id
    dream = adapt_ar.dream_from_ar(folder, mask)
    assert dream.config.arch == "dream" and dream.config.logit_shift
    ids = _batch([5], [20], vocab=40).ids
    causal = torch.arange(ids.shape[1], dtype=torch.int32)[None]
    expected = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    torch.testing.assert_close(dream(ids, block_ids=causal), expected, atol=1e-4, rtol=1e-4)
    # Bidirectional attention is a different model: the anneal has something to learn.
    assert (dream(ids, block_ids=torch.zeros_like(causal)) - expected).abs().max() > 1e-3


def test_anneal_goes_from_causal_to_bidirectional():
    batch = _batch([3, 5], [9, 4])  # L = 12, the second row padded
    first = adapt_ar.anneal_block_ids(batch, 0, 8)
    assert first[0].tolist() == list(range(12))
    assert first[1].tolist() == list(range(9)) + [-1] * 3
    sizes = []
    for step in range(8):
        ids = adapt_ar.anneal_block_ids(batch, step, 8)[0]
        sizes.append(int((ids == 0).sum()))
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] < 12
    assert adapt_ar.anneal_block_ids(batch, 8, 8)[0].tolist() == [0] * 12
    assert adapt_ar.anneal_block_ids(batch, 8, 8)[1].tolist() == [0] * 9 + [-1] * 3


def test_adapt_loss_falls_and_gives_a_dream_teacher(ar, tmp_path):
    folder, _ = ar
    out = str(tmp_path / "adapted")
    losses = adapt_ar.main(["--ar", folder, "--out", out, "--steps", "30", "--anneal", "10", "--batch", "8",
                            "--train-size", "200", "--lr", "3e-3", "--warmup", "3"])
    assert fell(losses), losses
    model = load_model(out)
    assert model.config.arch == "dream" and model.config.hidden_size == 32
    assert AutoD2FModel.from_pretrained(out).tokenizer.mask_token_id == model.config.mask_token_id


def test_adapt_rejects_a_bad_anneal(ar, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        adapt_ar.main(["--ar", ar[0], "--out", str(tmp_path / "x"), "--anneal", "-1"])
    assert e.value.code == 2 and "--anneal must be >= 0, got -1" in capsys.readouterr().err


def test_distill_pads_with_eos_id_when_the_tokenizer_has_neither(teacher, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "teacher"
    shutil.copytree(teacher[0], folder, ignore=shutil.ignore_patterns(tc.STATE_DIR))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).eos_token_id is None
    args = ["--teacher", str(folder), "--full-finetune", "--steps", "1", "--batch", "2", "--train-size", "2",
            "--device", "cpu"]
    with pytest.raises(ValueError, match="--eos-id"):
        distill.main([*args, "--out", str(tmp_path / "a")])
    eos = AutoTokenizer.from_pretrained(teacher[0]).eos_token_id
    losses = distill.main([*args, "--out", str(tmp_path / "b"), "--eos-id", str(eos)])
    assert len(losses) == 1 and math.isfinite(losses[0])


# --- arguments -------------------------------------------------------------------------------

def _tokenizer_folder(folder):
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text("{}")  # all the argument check looks for
    return str(folder)


@pytest.mark.parametrize("command, args, message", [
    (train_teacher, ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (train_teacher, ["--steps", "0"], "--steps must be >= 1, got 0"),
    (train_teacher, ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (train_teacher, ["--gen-len", "0"], "--gen-len must be >= 1, got 0"),
    (train_ar, ["--train-size", "0"], "--train-size must be >= 1, got 0"),
    (train_ar, ["--batch", "0"], "--batch must be >= 1, got 0"),
    (train_ar, ["--steps", "0"], "--steps must be >= 1, got 0"),
    (train_ar, ["--intermediate", "0"], "--intermediate must be >= 1, got 0"),
    (train_ar, ["--threads", "0"], "--threads must be >= 1, got 0"),
    (adapt_ar, ["--batch", "0"], "--batch must be >= 1, got 0"),
    (adapt_ar, ["--block-size", "0"], "--block-size must be >= 1, got 0"),
    (distill, ["--steps", "0"], "--steps must be >= 1, got 0"),
    (distill, ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (distill, ["--train-size", "0"], "--train-size must be >= 1, got 0"),
    (distill, ["--lora-r", "0"], "--lora-r must be >= 1, got 0"),
    (distill, ["--data-weight", "-1"], "--data-weight must be >= 0, got -1.0"),
    (distill, ["--data-weight", "nan"], "--data-weight must be >= 0, got nan"),
    (distill, ["--full-finetune", "--merge-to", "m"], "--merge-to needs a LoRA run"),
])
def test_trainers_reject_bad_arguments_by_name(command, args, message, tmp_path, capsys):
    folder = _tokenizer_folder(tmp_path / "source")
    source = {adapt_ar: ["--ar", folder], distill: ["--teacher", folder]}.get(command, [])
    with pytest.raises(SystemExit) as e:
        command.parse_args(["--out", str(tmp_path / "out"), *source, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_warmup_may_be_skipped():
    assert train_teacher.parse_args(["--out", "x", "--warmup", "0"]).warmup == 0


def test_copy_tokenizer_refuses_a_folder_without_one(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=re.escape(f"{missing} holds no tokenizer.json")):
        tokenizer_math.copy_tokenizer(missing, str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("command, flag, args", [
    (adapt_ar, "--ar", []),
    (train_ar, "--tokenizer", []),
    (train_teacher, "--tokenizer", []),
    (distill, "--teacher", ["--full-finetune"]),  # the checkpoint takes the teacher's tokenizer
])
def test_commands_name_a_source_folder_without_a_tokenizer(command, flag, args, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as e:
        command.parse_args(["--out", str(tmp_path / "out"), flag, missing, *args])
    assert e.value.code == 2 and f"{flag}: {missing} holds no tokenizer.json" in capsys.readouterr().err
