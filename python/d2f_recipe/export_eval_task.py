"""Writes the data of the lm-eval task d2f_math: the held-out problems that evaluate.py scores
(task_math test split, seed 0, small level, in the same order), one JSON object a line, into
the package (d2f_ext/evaluation/tasks/d2f_math), so that `d2f-eval --tasks d2f_math` runs offline.

    python -m d2f_recipe.export_eval_task [--problems 100]
"""

from __future__ import annotations

import argparse
import json
import os

import d2f_ext
from d2f_recipe import task_math

# Inside the d2f_ext package as imported (the repository's with an editable install).
OUT = os.path.join(os.path.dirname(os.path.abspath(d2f_ext.__file__)), "evaluation", "tasks", "d2f_math",
                   "d2f_math_test.jsonl")


def records(n: int) -> list[dict]:
    return [dict(question=p.question, answer=p.answer, solution=p.solution)
            for p in task_math.problems("test", n, seed=0, level="small")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=100)
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    if a.problems < 1:
        p.error(f"--problems must be >= 1, got {a.problems}")
    with open(a.out, "w", encoding="utf-8") as f:
        for r in records(a.problems):
            f.write(json.dumps(r) + "\n")
    print(f"wrote {a.problems} problems to {os.path.normpath(a.out)}")


if __name__ == "__main__":
    main()
