"""The model the repository ships as d2f-generate's default: a real checkpoint folder, trained
(it writes the task's solution format on held-out problems) and decoded identically by both paths."""

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from d2f_ext import AutoD2FModel, cli
from d2f_recipe import task_math


@pytest.fixture(scope="module")
def model():
    return AutoD2FModel.from_pretrained(cli.DEFAULT_MODEL)


def test_shipped_folder_is_a_checkpoint_with_decoding_settings(model):
    names = set(os.listdir(cli.DEFAULT_MODEL))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert sum(os.path.getsize(os.path.join(cli.DEFAULT_MODEL, n)) for n in names) < 30 * 2 ** 20
    gc = model.generation_config
    assert (gc.block_size, gc.max_new_tokens) == (4, 64)
    tok = model.tokenizer
    assert (tok.mask_token_id, tok.eos_token_id) == (model.config.mask_token_id, model.config.eos_token_id)


def test_writes_the_solution_format_on_held_out_problems(model):
    tok = model.tokenizer
    problems = task_math.problems("test", 8, seed=1, level="small")  # the level it was trained on
    texts = [tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                     add_generation_prompt=True) for p in problems]
    assert texts[0] == task_math.format_prompt(problems[0].question)
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, return_dict_in_generate=True)
    width = enc["input_ids"].shape[1]
    answers = [tok.decode(row[width:], skip_special_tokens=True) for row in out.sequences]
    assert sum(task_math.answer_of(a) is not None for a in answers) >= 5, answers  # untrained: 0
    right, written = map(sum, zip(*(task_math.steps_right(a) for a in answers)))
    assert written >= 2 * len(problems) and right > 0
    assert float(out.tokens_per_forward.mean()) > 1.2  # D2F decodes more than a token per forward
    # The kernel path and the plain-PyTorch loop agree on the trained model too.
    assert torch.equal(model.generate(**enc, decoder="reference"), out.sequences)


# The README's first example, d2f-generate's default question, and held-out problems (the test
# split, never trained on) that the shipped model answers: a regression test of the artifact.
README_QUESTION = ("Ava has 14 stickers. Ava gets 8 more stickers and then gives 10 of them away. "
                   "How many stickers does Ava have now?", 12)
HELD_OUT = [task_math.problems("test", 12, seed=1, level="small")[i] for i in (0, 1, 3, 5, 7, 10)]


def test_answers_fixed_questions_right(model):
    tok = model.tokenizer
    asked = [README_QUESTION, (cli.DEFAULT_PROMPT, 14)] + [(p.question, p.answer) for p in HELD_OUT]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q, _ in asked]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc)
    width = enc["input_ids"].shape[1]
    answers = [tok.decode(row[width:], skip_special_tokens=True) for row in out]
    assert [task_math.answer_of(a) for a in answers] == [want for _, want in asked], answers


def test_cli_default_answers_its_default_question():
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main([]) == 0
    assert "The answer is 14." in out.getvalue()
    assert "tokens_per_forward=" in err.getvalue()


def _cli(argv):
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    return out.getvalue().rstrip("\n")


def test_cli_no_chat_sends_the_prompt_as_is():
    # The chat template writes the trained prompt format: sent as is, that format decodes alike.
    assert _cli(["--no-chat", "--prompt", task_math.format_prompt(cli.DEFAULT_PROMPT)]) == _cli([])


def test_cli_stop_string_ends_the_completion_at_its_first_occurrence():
    full, cut = _cli([]), _cli(["--stop", " = "])
    assert full.startswith(cut) and cut.count(" = ") == 1 and len(cut) < len(full)
