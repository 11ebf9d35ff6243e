"""Grade-school math word problems with step-by-step solutions ending in "The answer is N".

A problem is a template (a fixed chain of two or three operations told as a story) filled with
names, objects and numbers drawn from a seeded RNG. Train and test are disjoint by construction:
a problem belongs to the test split iff a hash of its question text falls in the test bucket,
so no seed can put the same question in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
import re
from typing import Callable, Optional

NAMES = ["Tom", "Mia", "Sam", "Lena", "Omar", "Ava", "Ben", "Zoe", "Ravi", "Nina", "Leo", "Emma",
         "Jack", "Sara", "Ali", "Kim", "Max", "Ivy", "Noah", "Lucy"]
OBJECTS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
           "stamps", "eggs", "candies", "coins", "flowers", "toys", "balloons", "oranges"]
CONTAINERS = ["boxes", "bags", "packs", "baskets", "jars", "crates"]
PLACES = ["farm", "shop", "school", "library", "bakery", "zoo"]
ITEMS = ["notebook", "ticket", "sandwich", "toy car", "book", "shirt", "lamp", "puzzle"]
ANSWER_RE = re.compile(r"The answer is (-?\d+)")
STEP_RE = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
TEST_BUCKETS = 10  # one question hash in ten goes to the test split


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the steps, then "The answer is N"
    answer: int


def _step(a: int, op: str, b: int) -> tuple[int, str]:
    value = OPS[op](a, b)
    return value, f"{a} {op} {b} = {value}."


def _finish(question: str, lead: str, steps: list[str], answer: int) -> Problem:
    solution = " ".join(([lead] if lead else []) + steps + [f"The answer is {answer}."])
    return Problem(question, solution, answer)


# Each template draws its numbers so that every intermediate value stays a whole, non-negative
# number of a few digits: the model learns arithmetic, not rounding or negative counts. The
# "small" level draws the same stories with numbers up to 20 and one-digit factors: few enough
# arithmetic facts that a model of a few million parameters trained for an hour on two CPU cores
# can learn them (the AR baseline does; the diffusion teacher learns them far more slowly).

LEVELS = ("gsm", "small")


def _num(r: random.Random, small: bool, gsm: tuple[int, int], small_range: tuple[int, int]) -> int:
    return r.randint(*(small_range if small else gsm))


def _buy_give(r: random.Random, small: bool) -> Problem:
    n, m, obj = *r.sample(NAMES, 2), r.choice(OBJECTS)
    a, b = _num(r, small, (10, 400), (2, 20)), _num(r, small, (5, 300), (2, 20))
    c = r.randint(1, a + b)
    x, s1 = _step(a, "+", b)
    y, s2 = _step(x, "-", c)
    buy = r.choice(["buys", "gets", "finds", "is given"])
    give = r.choice(["gives", "sells", "loses"])
    q = r.choice([
        f"{n} has {a} {obj}. {n} {buy} {b} more {obj} and then {give} {c} of them. How many {obj} does {n} have now?",
        f"{n} had {a} {obj}. Then {n} {buy} {b} {obj} and {give} {c} to {m}. How many {obj} does {n} have left?",
    ])
    return _finish(q, f"{n} starts with {a} {obj}.", [s1, s2], y)


def _containers(r: random.Random, small: bool) -> Problem:
    n, obj, box = r.choice(NAMES), r.choice(OBJECTS), r.choice(CONTAINERS)
    a, b = _num(r, small, (2, 40), (2, 9)), _num(r, small, (2, 12), (2, 9))
    c = r.randint(1, a * b)
    x, s1 = _step(a, "*", b)
    y, s2 = _step(x, "-", c)
    q = r.choice([
        f"{n} buys {a} {box} of {obj}. Each of the {box} holds {b} {obj}. {n} uses {c} of them. How many {obj} are left?",
        f"There are {a} {box} with {b} {obj} in each. {n} takes {c} {obj} away. How many {obj} remain?",
    ])
    return _finish(q, f"There are {a} {box} of {b} {obj}.", [s1, s2], y)


def _share(r: random.Random, small: bool) -> Problem:
    n, obj = r.choice(NAMES), r.choice(OBJECTS)
    b, x0 = r.randint(2, 9), _num(r, small, (2, 60), (2, 9))
    a, c = b * x0, _num(r, small, (1, 90), (1, 20))
    x, s1 = _step(a, "/", b)
    y, s2 = _step(x, "+", c)
    q = r.choice([
        f"{n} shares {a} {obj} equally among {b} friends. Each friend then gets {c} more {obj}. How many {obj} does each friend have?",
        f"{a} {obj} are split evenly into {b} groups. Then {c} {obj} are added to each group. How many {obj} are in one group?",
    ])
    return _finish(q, "", [s1, s2], y)


def _wages(r: random.Random, small: bool) -> Problem:
    n = r.choice(NAMES)
    a, b = _num(r, small, (5, 90), (2, 9)), r.randint(2, 9)
    c = r.randint(1, a * b)
    x, s1 = _step(a, "*", b)
    y, s2 = _step(x, "-", c)
    q = r.choice([
        f"{n} earns {a} dollars a day. After {b} days {n} spends {c} dollars. How many dollars does {n} have left?",
        f"{n} saves {a} dollars every week for {b} weeks, then buys a gift for {c} dollars. How much money is left?",
    ])
    return _finish(q, f"{n} gets {a} dollars {b} times.", [s1, s2], y)


def _times_as_many(r: random.Random, small: bool) -> Problem:
    n, m, obj = *r.sample(NAMES, 2), r.choice(OBJECTS)
    a, b = _num(r, small, (3, 99), (2, 9)), r.randint(2, 9)
    x, s1 = _step(a, "*", b)
    y, s2 = _step(a, "+", x)
    q = r.choice([
        f"{n} has {a} {obj}. {m} has {b} times as many {obj} as {n}. How many {obj} do they have together?",
        f"{m} collected {b} times as many {obj} as {n}, who collected {a}. How many {obj} did both collect in total?",
    ])
    return _finish(q, f"{m} has {b} times {a} {obj}.", [s1, s2], y)


def _change(r: random.Random, small: bool) -> Problem:
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = _num(r, small, (2, 60), (2, 9)), r.randint(2, 9)
    c = a * b + _num(r, small, (0, 200), (0, 20))
    x, s1 = _step(a, "*", b)
    y, s2 = _step(c, "-", x)
    q = r.choice([
        f"A {item} costs {a} dollars. {n} buys {b} of them and pays with {c} dollars. How much change does {n} get?",
        f"{n} has {c} dollars and buys {b} {item}s at {a} dollars each. How many dollars are left?",
    ])
    return _finish(q, f"{b} {item}s cost {b} times {a} dollars.", [s1, s2], y)


def _three_steps(r: random.Random, small: bool) -> Problem:
    place, obj = r.choice(PLACES), r.choice(OBJECTS)
    a, b, d = _num(r, small, (20, 500), (5, 20)), _num(r, small, (10, 300), (5, 20)), r.randint(2, 5)
    c = r.randint(0, a + b)
    c += (a + b - c) % d  # what is left splits evenly; c stays within [0, a + b]
    x, s1 = _step(a, "+", b)
    y, s2 = _step(x, "-", c)
    z, s3 = _step(y, "/", d)
    q = r.choice([
        f"A {place} has {a} {obj}. It gets {b} more and sells {c}. The rest is packed equally into {d} boxes. How many {obj} are in each box?",
        f"The {place} starts the day with {a} {obj}, receives {b} and gives away {c}. What is left is split evenly among {d} shelves. How many {obj} go on each shelf?",
    ])
    return _finish(q, f"The {place} starts with {a} {obj}.", [s1, s2, s3], z)


def _rows(r: random.Random, small: bool) -> Problem:
    n, obj = r.choice(NAMES), r.choice(OBJECTS)
    a, b, c = _num(r, small, (2, 30), (2, 9)), _num(r, small, (2, 20), (2, 9)), _num(r, small, (2, 200), (2, 20))
    x, s1 = _step(a, "*", b)
    y, s2 = _step(x, "+", c)
    q = r.choice([
        f"{n} puts {obj} in {a} rows of {b}. Then {n} adds {c} more {obj}. How many {obj} are there now?",
        f"A shelf has {a} rows with {b} {obj} in each row, and a box holds {c} more {obj}. How many {obj} are there in all?",
    ])
    return _finish(q, f"The rows hold {a} times {b} {obj}.", [s1, s2], y)


TEMPLATES: list[Callable[[random.Random, bool], Problem]] = [
    _buy_give, _containers, _share, _wages, _times_as_many, _change, _three_steps, _rows]


def _is_test(question: str) -> bool:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % TEST_BUCKETS == 0


def problems(split: str, n: int, seed: int = 0, level: str = "gsm") -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "test") at ``level`` (one of LEVELS), the
    same for the same seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    # The split name enters the seed so that a test set of seed s does not simply replay the
    # draws the train set of seed s rejected.
    r = random.Random(f"{split}:{seed}")
    out, seen = [], set()
    while len(out) < n:
        p = r.choice(TEMPLATES)(r, level == "small")
        if _is_test(p.question) == (split == "test") and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def add_level_arg(parser) -> None:
    """--level, for the scripts that train or evaluate on the task: all must use the same one."""
    parser.add_argument("--level", choices=LEVELS, default="small",
                        help="difficulty; small is sized for models trained on two CPU cores")


def format_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


# The tokenizer's chat template renders a user message as format_prompt does, so that a chat
# front end (d2f-generate applies a model's template) asks the small models as they were trained.
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }} Answer:{% endif %}{% endfor %}"


def answer_of(text: str) -> Optional[int]:
    """N of the first "The answer is N" in ``text``, or None."""
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def steps_right(text: str) -> tuple[int, int]:
    """(right, written): the arithmetic steps "a op b = c" in ``text`` and how many of them compute
    correctly. Finer than the final answer, which needs every step and every copied number right."""
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP_RE.findall(text)]
    return sum(not (op == "/" and b == 0) and OPS[op](a, b) == c for a, op, b, c in steps), len(steps)
