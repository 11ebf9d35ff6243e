"""d2f_recipe.tune: the pick rule, and a run on tiny models that stores its pick without losing the
student's other generation settings, which d2f_recipe.evaluate then decodes with."""

import json
import pathlib
import re

import pytest
import torch

from d2f_recipe import evaluate, task_math, tune


def _row(skip, acc, tpf, add=0.1, block=16):
    return dict(block_size=block, skip_threshold=skip, block_add_threshold=add, accuracy=acc,
                tokens_per_forward=tpf)


def test_pick_is_the_most_parallel_setting_within_tolerance():
    rows = [_row(0.5, 0.28, 7.2), _row(0.7, 0.307, 5.9), _row(0.8, 0.31, 5.4), _row(0.9, 0.31, 4.7)]
    assert tune.pick(rows, 1.0)["skip_threshold"] == 0.7
    assert tune.pick(rows, 0.0)["skip_threshold"] == 0.8  # the most accurate, then most parallel
    assert tune.pick(rows, 3.0)["skip_threshold"] == 0.5
    # Exactly at the tolerance is within it (0.31 - 0.30 in floating point is 0.010000000000000009).
    assert tune.pick([_row(0.9, 0.31, 4.0), _row(0.6, 0.30, 6.0)], 1.0)["skip_threshold"] == 0.6
    # Equal parallelism: the higher (safer) thresholds, skip first, then block-add.
    assert tune.pick([_row(0.6, 0.3, 5.0), _row(0.9, 0.3, 5.0)], 1.0)["skip_threshold"] == 0.9
    tied = [_row(0.7, 0.3, 5.0, add=0.5), _row(0.7, 0.3, 5.0, add=0.9), _row(0.7, 0.3, 5.0, add=0.1)]
    assert tune.pick(tied, 1.0)["block_add_threshold"] == 0.9
    assert tune.pick([_row(0.9, 0.3, 5.0, block=8), _row(0.9, 0.3, 5.0, block=16)], 1.0)["block_size"] == 16
    # A smaller block that is more accurate but no more parallel wins only within the tolerance.
    sizes = [_row(0.9, 0.90, 3.0, block=4), _row(0.9, 0.88, 4.5, block=8), _row(0.9, 0.82, 5.2)]
    assert tune.pick(sizes, 1.0)["block_size"] == 4 and tune.pick(sizes, 2.0)["block_size"] == 8
    with pytest.raises(ValueError, match="tolerance"):
        tune.pick(rows, -1.0)
    with pytest.raises(ValueError, match="no settings"):
        tune.pick([], 1.0)


def test_tune_writes_its_pick_and_evaluate_reads_it(tmp_path):
    paths = evaluate.train_smoke(str(tmp_path))
    student = paths["student"]
    config = pathlib.Path(student) / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": 0}))  # kept as is
    before = json.loads(config.read_text())
    threads = torch.get_num_threads()
    out = tune.main(["--student", student, "--teacher", paths["teacher"], "--after", "3", "--problems", "2",
                         "--sweep-block", "8,16", "--sweep-skip", "0.6,0.95", "--sweep-add", "0.1",
                         "--vanilla-blocks", "4,16", "--threads", "1", "--write", "--out", str(tmp_path / "tune")])
    assert [r["block_size"] for r in out["teacher_vanilla"]] == [4, 16]
    for van in out["teacher_vanilla"]:
        assert van["problems"] == 2 and van["forwards"] == 2 * before["max_new_tokens"]  # one token a step
    assert len((tmp_path / "tune" / "tune.md").read_text().splitlines()) == 2 + 4 + 2
    assert torch.get_num_threads() == threads
    assert {(r["block_size"], r["skip_threshold"], r["block_add_threshold"]) for r in out["rows"]} == \
        {(8, 0.6, 0.1), (8, 0.95, 0.1), (16, 0.6, 0.1), (16, 0.95, 0.1)}
    assert out["pick"] in out["rows"]
    assert all(r["problems"] == 2 for r in out["rows"])
    assert out["base"]["block_size"] == before["block_size"]
    assert out["base"]["max_new_tokens"] == before["max_new_tokens"]
    saved = json.loads(config.read_text())
    saved.pop("transformers_version")  # GenerationConfig.save_pretrained records it
    assert saved == {**before, "block_size": out["pick"]["block_size"],
                     "skip_threshold": out["pick"]["skip_threshold"], "block_add_threshold": 0.1}
    assert json.loads((tmp_path / "tune" / "tune.json").read_text())["pick"] == out["pick"]
    # evaluate's student settings: the saved thresholds, overridden by the flags given.
    args = evaluate.parse_args(["--student", student, "--decoded-token-threshold", "0.8"])
    cfg = evaluate.d2f_config(args, student)
    assert (cfg.skip_threshold, cfg.block_add_threshold, cfg.decoded_token_threshold) == \
        (out["pick"]["skip_threshold"], 0.1, 0.8)
    args = evaluate.parse_args(["--skip-threshold", "0.55"])
    assert evaluate.d2f_config(args, student).skip_threshold == 0.55
    assert evaluate.d2f_config(args, str(tmp_path)).decoded_token_threshold == 0.95  # no file: defaults
    # The Fast-dLLM baseline decodes with the teacher's settings, not the student's tuned ones.
    args = evaluate.parse_args(["--teacher", paths["teacher"], "--student", student, "--ar", paths["ar"],
                                 "--threads", "1"])
    _, _, _, cfg, fast = evaluate.load_methods(args)
    assert cfg.skip_threshold == out["pick"]["skip_threshold"]
    # The student, and Fast-dLLM beside it, decode the block size tune picked, unless told otherwise.
    assert cfg.block_size == fast.block_size == out["pick"]["block_size"]
    args = evaluate.parse_args(["--student", student, "--block-size", "32"])
    assert evaluate.d2f_config(args, student).block_size == 32
    assert (fast.skip_threshold, fast.block_add_threshold) == (evaluate.D2FConfig().skip_threshold, 1.0)


@pytest.mark.parametrize("level", task_math.LEVELS)
def test_validation_problems_follow_the_tables(level):
    table = task_math.problems("test", 100, 0, level)
    validation = tune.validation_problems(100, 50, 0, level)
    assert len(validation) == 50 and validation[0] != table[0]
    assert not {p.question for p in table} & {p.question for p in validation}
    assert tune.validation_problems(0, 100, 0, level) == table


@pytest.mark.parametrize("args, message", [
    (["--problems", "0"], "--problems must be >= 1"),
    (["--after", "-1"], "--after must be >= 0"),
    (["--tolerance", "-0.5"], "--tolerance must be >= 0"),
    (["--sweep-skip", "0.5,1.2"], r"--sweep-skip: a threshold must be in \[0, 1\], got '1.2'"),
    (["--sweep-add", ""], "--sweep-add: needs one or more"),
    (["--sweep-skip", "0.5,high"], "--sweep-skip: not a number: 'high'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--sweep-block", "8,0"], "--sweep-block: needs one or more comma-separated block sizes >= 1"),
    (["--vanilla-blocks", "four"], "--vanilla-blocks: not integers: 'four'"),
])
def test_bad_arguments_name_themselves(args, message, capsys):
    with pytest.raises(SystemExit):
        tune.parse_args(["--student", "s", *args])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--problems", "0"], "--problems must be >= 1"),
    (["--skip-threshold", "2"], r"--skip-threshold: a threshold must be in \[0, 1\], got '2'"),
    (["--decoded-token-threshold", "x"], "--decoded-token-threshold: not a number"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--vanilla-steps", "0"], "--vanilla-steps must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--block-size", "-1"], "--block-size must be >= 1, got -1"),
    (["--vanilla-block-size", "0"], "--vanilla-block-size must be >= 1, got 0"),
])
def test_evaluate_bad_arguments_name_themselves(args, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(args)
    assert re.search(message, capsys.readouterr().err)


def test_a_vanilla_block_size_that_does_not_divide_the_canvas_fails_before_the_sweep(tmp_path, monkeypatch):
    paths = evaluate.train_smoke(str(tmp_path))

    def sweep(*args, **kwargs):
        raise AssertionError("the student sweep ran before the teacher's settings were checked")

    monkeypatch.setattr(evaluate, "run_sweep", sweep)
    with pytest.raises(ValueError, match=r"max_new_tokens \(64\) must be a positive multiple of block_size \(5\)"):
        tune.main(["--student", paths["student"], "--teacher", paths["teacher"], "--after", "3", "--problems", "1",
                   "--vanilla-blocks", "5", "--threads", "1", "--out", str(tmp_path / "tune")])


def test_a_student_without_its_generation_settings_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--student: .*block_size and max_new_tokens"):
        tune.main(["--student", str(tmp_path), "--problems", "1"])
