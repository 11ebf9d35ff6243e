"""Pick the D2F student's block size, skip_threshold and block_add_threshold on validation problems
and store them in its generation_config.json, the defaults of model.generate, d2f-generate and
evaluate.

The validation problems are the test split's problems after the first --after (default 100: the
ones evaluate's table is measured on), so the table is never run on the problems it was tuned on.
The pick: among the grid's settings within --tolerance points of the most accurate one, the one
with the most tokens per forward (a count: the pick does not move with machine noise as tokens/s
would; ties go to the higher thresholds, the safer ones: skip_threshold, then block_add_threshold,
then to the larger block). --teacher adds the teacher's vanilla decoding at each of
--vanilla-blocks, the accuracy the student's is held against.

    python -m d2f_recipe.tune --student runs/student --write
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from d2f_bench.common import environment, torch_threads, write_json, write_markdown
from d2f_ext import D2FConfig
from d2f_ext.auto import load_generation_config
from d2f_ext.models import load_model
from d2f_recipe import evaluate, task_math
from d2f_recipe import training as tc


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="checkpoint folder of the D2F student")
    p.add_argument("--teacher", help="also decode the validation problems with this teacher's vanilla "
                   "decoding (one token a step): the accuracy the student's is held against")
    p.add_argument("--vanilla-blocks", type=block_sizes, help="comma-separated block sizes of the "
                   "teacher's vanilla decoding (default: --sweep-block)")
    p.add_argument("--after", type=int, default=100, help="test-split problems left to the table")
    p.add_argument("--problems", type=int, default=300, help="validation problems")
    p.add_argument("--seed", type=int, default=0, help="test-split seed (evaluate's)")
    task_math.add_level_arg(p)
    p.add_argument("--sweep-block", type=block_sizes, help="comma-separated block sizes (default: the "
                   "student's, the one it was distilled with)")
    p.add_argument("--sweep-skip", type=evaluate.thresholds, default=evaluate.SWEEP_SKIP)
    p.add_argument("--sweep-add", type=evaluate.thresholds, default=evaluate.SWEEP_ADD)
    p.add_argument("--tolerance", type=float, default=1.0, help="accuracy points below the best still eligible")
    p.add_argument("--write", action="store_true", help="store the pick in the student's generation_config.json")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/tune")
    a = p.parse_args(argv)
    tc.check_counts(p, a, problems=1, after=0, threads=1)
    if a.tolerance < 0:
        p.error(f"--tolerance must be >= 0, got {a.tolerance}")
    return a


def block_sizes(text: str) -> tuple[int, ...]:
    """argparse type: one or more comma-separated block sizes, each >= 1."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not integers: {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"needs one or more comma-separated block sizes >= 1, got {text!r}")
    return out


def validation_problems(after: int, n: int, seed: int, level: str):
    """The ``n`` test-split problems after the first ``after``: the draws are a fixed sequence
    per seed, so these never include the first ``after``, which evaluate's table uses."""
    return task_math.problems("test", after + n, seed, level)[after:]


def pick(rows: list[dict], tolerance: float) -> dict:
    """The row with the most tokens per forward among those within ``tolerance`` points of the
    best accuracy; ties to the higher (safer) thresholds, then to the larger block."""
    if not rows:
        raise ValueError("no settings to pick from")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(r["accuracy"] for r in rows)
    eligible = [r for r in rows if 100 * (best - r["accuracy"]) <= tolerance + 1e-9]
    return max(eligible, key=lambda r: (r["tokens_per_forward"], r["skip_threshold"], r["block_add_threshold"],
                                        r["block_size"]))


def main(argv=None) -> dict:
    a = parse_args(argv)
    with torch_threads(a.threads):
        return _run(a)


def _run(a) -> dict:
    from transformers import AutoTokenizer

    gc = load_generation_config(a.student)
    if getattr(gc, "block_size", None) is None or getattr(gc, "max_new_tokens", None) is None:
        raise ValueError(f"--student: {a.student}/generation_config.json must give block_size and "
                         "max_new_tokens, the student's training blocks and canvas (distill writes them)")
    base = D2FConfig.from_generation_config(gc)
    problems = validation_problems(a.after, a.problems, a.seed, a.level)
    student = load_model(a.student, device=a.device).eval()
    tok = AutoTokenizer.from_pretrained(a.student)
    blocks = a.sweep_block or (base.block_size,)
    vanilla = []
    if a.teacher:  # first: a block size vanilla decoding cannot take fails before the long sweep
        teacher = load_model(a.teacher, device=a.device).eval()
        t_tok = AutoTokenizer.from_pretrained(a.teacher)
        methods = {size: evaluate.vanilla_method(teacher, t_tok, base.max_new_tokens, size, base.max_new_tokens)
                   for size in a.vanilla_blocks or blocks}
        res = evaluate.evaluate({f"vanilla, blocks of {n}": m for n, m in methods.items()}, problems, "teacher")
        vanilla = [dict(block_size=n, **{k: v for k, v in r.items() if k != "records"})
                   for n, r in zip(methods, res.values())]
        for r in vanilla:
            print(f"teacher, vanilla, blocks of {r['block_size']}: accuracy {r['accuracy']:.3f}")
    rows = evaluate.run_sweep(base, a.sweep_skip, a.sweep_add, student, tok, problems, blocks)
    chosen = pick(rows, a.tolerance)
    for r in rows:
        mark = " <- pick" if r is chosen else ""
        print(f"block {r['block_size']:<3} skip {r['skip_threshold']:<5} add {r['block_add_threshold']:<4} "
              f"accuracy {r['accuracy']:.3f} tokens/forward {r['tokens_per_forward']:.2f} "
              f"tokens/s {r['tokens_per_s']:.0f}{mark}")
    payload = dict(env=environment(), args=vars(a), base=dataclasses.asdict(base), rows=rows, pick=chosen,
                   teacher_vanilla=vanilla)
    write_json(os.path.join(a.out, "tune.json"), payload)
    cells = [[r["block_size"], r["skip_threshold"], r["block_add_threshold"], f"{100 * r['accuracy']:.1f}%",
              f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_s']:.0f}"] for r in rows]
    cells += [[r["block_size"], "teacher, vanilla", "", f"{100 * r['accuracy']:.1f}%",
               f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_s']:.0f}"] for r in vanilla]
    write_markdown(os.path.join(a.out, "tune.md"), ["block_size", "skip_threshold", "block_add_threshold",
                                                    "accuracy", "tokens / forward", "tokens / s"], cells)
    if a.write:
        # Set, not update(): GenerationConfig.update skips keys it does not already hold.
        gc.block_size = chosen["block_size"]
        gc.skip_threshold, gc.block_add_threshold = chosen["skip_threshold"], chosen["block_add_threshold"]
        gc.save_pretrained(a.student)
        print(f"wrote block_size={chosen['block_size']} skip_threshold={chosen['skip_threshold']} "
              f"block_add_threshold={chosen['block_add_threshold']} to {a.student}/generation_config.json")
    return payload


if __name__ == "__main__":
    main()
