"""The end-to-end table of the D2F recipe on the math task: accuracy and speed of the AR baseline
(transformers generate, greedy, KV cache), the teacher under vanilla and Fast-dLLM-mode decoding,
and the D2F student on the kernel path and on the plain-PyTorch reference loop, in one run on the
same held-out problems (task_math test split), batch 1. The student decodes with the thresholds
in its generation_config.json (d2f_recipe.tune picks them on other problems) unless flags say otherwise.

Per method: accuracy (answer_of on the decoded text), the share of written arithmetic steps that
are right (task_math.steps_right), generated tokens/s (tokens before EOS only), forwards per
sequence and tokens per forward; the student against the teacher's vanilla decoding and the AR
model problem by problem (paired: McNemar). Methods alternate problem by problem so that
machine noise hits all alike. Writes e2e.json, e2e.md and e2e.png (tokens/s vs accuracy); --sweep
adds the student over a skip_threshold x block_add_threshold grid (sweep.json, .md, .png).
--smoke trains tiny models in a temporary folder and checks the outputs (CI).

    python -m d2f_recipe.evaluate --teacher runs/teacher --student runs/student --ar runs/ar --sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from typing import Callable

import torch

from d2f_bench.common import environment, torch_threads, write_json, write_markdown
from d2f_ext import D2FConfig
from d2f_ext.auto import load_generation_config
from d2f_ext.decoding import decode
from d2f_ext.models import load_adapter, load_model
from d2f_recipe import task_math
from d2f_recipe import training as tc

METHODS = ("ar", "teacher-vanilla", "teacher-fast-dllm", "d2f", "d2f-reference")
THRESHOLDS = ("block_add_threshold", "decoded_token_threshold", "skip_threshold")
SWEEP_SKIP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_ADD = (0.1, 0.5, 0.9)


@dataclasses.dataclass
class Method:
    """decode(prompt ids) -> (generated tokens before EOS, forwards); tokenizer turns them to text."""

    decode: Callable[[list[int]], tuple[list[int], int]]
    tokenizer: object


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="checkpoint folder of the masked-diffusion teacher")
    p.add_argument("--student", help="checkpoint folder of the D2F student (default: the teacher, "
                   "for --student-adapter)")
    p.add_argument("--student-adapter", help="PEFT LoRA adapter merged into --student at load")
    p.add_argument("--ar", default="runs/ar", help="folder saved by train_ar")
    p.add_argument("--problems", type=int, default=100, help="held-out problems (task_math test split)")
    p.add_argument("--seed", type=int, default=0, help="test-split seed")
    task_math.add_level_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length (training's gen_len)")
    p.add_argument("--block-size", type=int, help="the student's and Fast-dLLM's blocks (default: the "
                   "student's generation_config.json, which distill and tune write, else 16)")
    p.add_argument("--vanilla-block-size", type=int, help="the teacher's vanilla blocks (default: "
                   "--block-size; d2f_recipe.tune --teacher --vanilla-blocks measures several)")
    for name in THRESHOLDS:
        p.add_argument(f"--{name.replace('_', '-')}", type=threshold, help="default: the student's "
                       "generation_config.json (d2f_recipe.tune writes it), else D2FConfig's")
    p.add_argument("--vanilla-steps", type=int, help="default: max-new-tokens (one token a step)")
    p.add_argument("--sweep", action="store_true", help="also run the student over the threshold grid")
    p.add_argument("--sweep-skip", type=thresholds, default=SWEEP_SKIP, help="comma-separated skip thresholds")
    p.add_argument("--sweep-add", type=thresholds, default=SWEEP_ADD, help="comma-separated block-add thresholds")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/e2e")
    p.add_argument("--smoke", action="store_true", help="train tiny models in a temp folder, 3 problems, check outputs")
    a = p.parse_args(argv)
    tc.check_counts(p, a, problems=1, threads=1, max_new_tokens=1, block_size=1, vanilla_block_size=1,
                    vanilla_steps=1)
    return a


def threshold(text: str) -> float:
    """argparse type: a threshold, in [0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"a threshold must be in [0, 1], got {text!r}")
    return x


def thresholds(text: str) -> tuple[float, ...]:
    """argparse type: one or more comma-separated thresholds."""
    out = tuple(threshold(x) for x in text.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError("needs one or more comma-separated thresholds, got none")
    return out


def d2f_config(a, folder: str) -> D2FConfig:
    """A model's decoding settings: the flags given, then the thresholds in ``folder``'s
    generation_config.json (as model.generate would take them), then D2FConfig's defaults; the
    canvas and the block size (:func:`student_block_size`) are the same for every method."""
    gc = load_generation_config(folder)
    saved = {k: getattr(gc, k, None) for k in THRESHOLDS}  # None where not saved: the defaults apply
    return D2FConfig.from_generation_config(saved, block_size=student_block_size(a),
                                            max_new_tokens=a.max_new_tokens,
                                            **{k: getattr(a, k) for k in THRESHOLDS})


def student_block_size(a) -> int:
    """--block-size, else the student's generation_config.json block_size, else 16."""
    if a.block_size is not None:
        return a.block_size
    saved = getattr(load_generation_config(a.student or a.teacher), "block_size", None)
    return 16 if saved is None else int(saved)


def _diffusion(model, cfg: D2FConfig, decoder: str, steps=None) -> Callable[[list[int]], tuple[list[int], int]]:
    def run(ids):
        out = decode(model, [ids], cfg, decoder=decoder, steps=steps)
        return out.tokens_before_eos(model.config.eos_token_id)[0], int(out.forwards[0])
    return run


def vanilla_method(teacher, tokenizer, max_new_tokens: int, block_size: int, steps: int) -> Method:
    cfg = D2FConfig(block_size=block_size, max_new_tokens=max_new_tokens)
    return Method(_diffusion(teacher, cfg, "vanilla", steps), tokenizer)


def _ar(model, eos: int, pad: int, max_new: int, device) -> Callable[[list[int]], tuple[list[int], int]]:
    def decode(ids):
        x = torch.tensor([ids], device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[0, len(ids):].tolist()
        # One forward per new token (the first is the prefill), the EOS's included.
        return (out[: out.index(eos)] if eos in out else out), len(out)
    return decode


def load_methods(a):
    """(the five methods, the models by name, the student's tokenizer, the student's D2FConfig,
    the teacher's Fast-dLLM one): the sweep reuses the student and its settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = load_model(a.teacher, device=a.device).eval()
    student = load_model(a.student or a.teacher, device=a.device).eval()
    if a.student_adapter:
        load_adapter(student, a.student_adapter)
    ar = AutoModelForCausalLM.from_pretrained(a.ar, dtype=torch.float32).to(a.device).eval()
    t_tok, s_tok, ar_tok = (AutoTokenizer.from_pretrained(f) for f in (a.teacher, a.student or a.teacher, a.ar))
    cfg = d2f_config(a, a.student or a.teacher)
    # The teacher's own settings (D2FConfig's defaults unless its folder has some), not the
    # student's: those were tuned for the student.
    fast = D2FConfig.fast_dllm(**dataclasses.asdict(d2f_config(a, a.teacher)))
    steps = a.max_new_tokens if a.vanilla_steps is None else a.vanilla_steps
    vanilla_blocks = cfg.block_size if a.vanilla_block_size is None else a.vanilla_block_size
    methods = {
        "ar": Method(_ar(ar, ar_tok.eos_token_id, ar_tok.pad_token_id, a.max_new_tokens, a.device), ar_tok),
        "teacher-vanilla": vanilla_method(teacher, t_tok, a.max_new_tokens, vanilla_blocks, steps),
        "teacher-fast-dllm": Method(_diffusion(teacher, fast, "fast-dllm"), t_tok),
        "d2f": Method(_diffusion(student, cfg, "d2f"), s_tok),
        "d2f-reference": Method(_diffusion(student, cfg, "reference"), s_tok),
    }
    return methods, dict(teacher=teacher, student=student, ar=ar), s_tok, cfg, fast


def evaluate(methods: dict[str, Method], problems, desc: str) -> dict[str, dict]:
    """Per method: totals and one record per problem. Each method runs once on the first problem
    untimed (thread pools, allocator, generate's setup); then per problem every method runs, in
    an order rotated by one each problem so that none is always first after another's cache use."""
    from tqdm import tqdm

    prompts = {n: [m.tokenizer(task_math.format_prompt(p.question), add_special_tokens=False).input_ids
                   for p in problems] for n, m in methods.items()}
    for n, m in methods.items():
        m.decode(prompts[n][0])
    names = list(methods)
    res = {n: dict(seconds=0.0, tokens=0, forwards=0, correct=0, steps_right=0, steps=0, records=[]) for n in names}
    bar = tqdm(range(len(problems)), desc=desc, dynamic_ncols=True)
    for i in bar:
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            toks, fwd = methods[n].decode(prompts[n][i])
            dt = time.perf_counter() - t0
            text = methods[n].tokenizer.decode(toks)
            got = task_math.answer_of(text)
            right, written = task_math.steps_right(text)
            r = res[n]
            r["steps_right"] += right
            r["steps"] += written
            r["seconds"] += dt
            r["tokens"] += len(toks)
            r["forwards"] += fwd
            r["correct"] += got == problems[i].answer
            r["records"].append(dict(answer=problems[i].answer, predicted=got, tokens=len(toks), forwards=fwd,
                                     seconds=dt, steps_right=right, steps=written, text=text, ids=toks))
        if len(names) <= len(METHODS):  # a sweep's grid would not fit on one line
            bar.set_postfix(acc=" ".join(f"{res[n]['correct'] / (i + 1):.2f}" for n in names))
    return {n: summary(r, len(problems)) for n, r in res.items()}


def summary(r: dict, n: int) -> dict:
    return dict(accuracy=r["correct"] / n, step_accuracy=r["steps_right"] / max(r["steps"], 1),
                tokens_per_s=r["tokens"] / r["seconds"] if r["seconds"] else 0.0,
                forwards_per_sequence=r["forwards"] / n, tokens_per_forward=r["tokens"] / max(r["forwards"], 1),
                generated_tokens=r["tokens"], forwards=r["forwards"], seconds=r["seconds"], problems=n,
                records=r["records"])


def _over(x: float, y: float):
    # None, not inf, when the baseline generated nothing: JSON has no infinity.
    return x / y if y else None


def _points(x: float, y: float) -> float:
    # Rounded so that a difference of exactly 3 points of accuracy is -3, not
    # 100 * (0.82 - 0.85) = -3.0000000000000027, which would miss a ">= -3" target.
    return round(100 * (x - y), 6)


def ratios(rows: dict[str, dict]) -> dict:
    d, van, ar = rows["d2f"], rows["teacher-vanilla"], rows["ar"]
    return dict(vanilla_minus_ar_points=_points(van["accuracy"], ar["accuracy"]),
                d2f_over_ar_speed=_over(d["tokens_per_s"], ar["tokens_per_s"]),
                d2f_over_vanilla_speed=_over(d["tokens_per_s"], van["tokens_per_s"]),
                d2f_minus_vanilla_points=_points(d["accuracy"], van["accuracy"]),
                d2f_minus_ar_points=_points(d["accuracy"], ar["accuracy"]))


# The methods the student is compared with problem by problem.
PAIRED_WITH = ("teacher-vanilla", "ar")


def paired(a: dict, b: dict) -> dict:
    """Two methods' results on the same problems, problem by problem: how many only ``a`` got
    right, how many only ``b``, and the exact two-sided McNemar p-value of that split (the chance
    of one at least as uneven between two equally accurate methods). On 100 problems a gap of a
    few points of accuracy is often within chance; this says how often."""
    ra, rb = a["records"], b["records"]
    if len(ra) != len(rb) or any(x["answer"] != y["answer"] for x, y in zip(ra, rb)):
        raise ValueError("paired: the two methods' records are not of the same problems")
    only_a = sum(x["predicted"] == x["answer"] and y["predicted"] != y["answer"] for x, y in zip(ra, rb))
    only_b = sum(y["predicted"] == y["answer"] and x["predicted"] != x["answer"] for x, y in zip(ra, rb))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return dict(only_first=only_a, only_second=only_b, p_value=min(1.0, 2 * tail))


def report(rows: dict[str, dict], r: dict, pairs: dict[str, dict]) -> None:
    """The table, then the ratios against the recipe's targets: the teacher's vanilla accuracy at
    most 5 points below AR's; the student's tokens/s >= 2x AR and >= 20x teacher-vanilla, its
    accuracy at most 3 points below the teacher's and 5 below AR's; then ``pairs``, the student
    against each of PAIRED_WITH problem by problem."""
    print(f"\n{'method':18} {'acc':>6} {'steps':>6} {'tok/s':>9} {'fwd/seq':>8} {'TPF':>6}")
    for n, s in rows.items():
        print(f"{n:18} {s['accuracy']:6.3f} {s['step_accuracy']:6.3f} {s['tokens_per_s']:9.1f} "
              f"{s['forwards_per_sequence']:8.1f} {s['tokens_per_forward']:6.2f}")

    def line(label, value, unit, target, met):
        shown = "n/a" if value is None else f"{value:{'+.1f' if unit == ' points' else '.2f'}}{unit}"
        print(f"{label:25} {shown:>12}  (target {target}: {'n/a' if value is None else 'met' if met else 'NOT met'})")

    for key, label, want in (("d2f_over_ar_speed", "D2F / AR tokens/s", 2), ("d2f_over_vanilla_speed",
                                                                            "D2F / vanilla tokens/s", 20)):
        line(label, r[key], "x", f">= {want}x", r[key] is not None and r[key] >= want)
    for key, label, floor in (("vanilla_minus_ar_points", "vanilla - AR accuracy", -5),
                              ("d2f_minus_vanilla_points", "D2F - vanilla accuracy", -3),
                              ("d2f_minus_ar_points", "D2F - AR accuracy", -5)):
        line(label, r[key], " points", f">= {floor} points", r[key] >= floor)
    for other in PAIRED_WITH:
        pr = pairs[f"d2f_vs_{other}"]
        print(f"d2f vs {other}, problem by problem: only d2f right on {pr['only_first']}, only {other} on "
              f"{pr['only_second']} (McNemar p = {pr['p_value']:.3f})")


def table_rows(rows: dict[str, dict], ar_speed: float | None = None) -> list[list]:
    out = []
    for n, s in rows.items():
        vs = _over(s["tokens_per_s"], ar_speed) if ar_speed is not None else None
        out.append([n, f"{s['accuracy'] * 100:.1f}%", f"{s['step_accuracy'] * 100:.1f}%", f"{s['tokens_per_s']:.1f}", f"{s['forwards_per_sequence']:.1f}",
                    f"{s['tokens_per_forward']:.2f}", "n/a" if vs is None else f"{vs:.2f}x"])
    return out


HEADER = ["method", "accuracy", "arithmetic steps right", "tokens / s", "forwards / sequence", "tokens / forward", "tokens / s vs AR"]


def _axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def plot(points: dict[str, dict], path: str, title: str) -> None:
    fig, ax = _axes()
    # A method that generated nothing has no place on a log axis; the table still lists it.
    for n, s in ((n, s) for n, s in points.items() if s["tokens_per_s"] > 0):
        ax.scatter(s["tokens_per_s"], 100 * s["accuracy"])
        ax.annotate(n, (s["tokens_per_s"], 100 * s["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    _finish(fig, ax, path, title)


def plot_sweep(sweep: list[dict], path: str) -> None:
    fig, ax = _axes()
    for add in sorted({s["block_add_threshold"] for s in sweep}):
        pts = sorted((s for s in sweep if s["block_add_threshold"] == add and s["tokens_per_s"] > 0),
                     key=lambda s: s["skip_threshold"])
        ax.plot([s["tokens_per_s"] for s in pts], [100 * s["accuracy"] for s in pts], "o-",
                label=f"block_add_threshold {add}")
        for s in pts:
            ax.annotate(f"{s['skip_threshold']}", (s["tokens_per_s"], 100 * s["accuracy"]),
                        textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.legend(fontsize=8)
    _finish(fig, ax, path, "D2F student: skip_threshold (labels) x block_add_threshold")


def _finish(fig, ax, path, title):
    # Methods span orders of magnitude in speed (vanilla vs D2F), hence the log axis.
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens / s")
    ax.set_ylabel("accuracy (%)")
    lo, hi = ax.get_ylim()
    # Autoscale zooms in on the points but may run past what an accuracy can be.
    ax.set_ylim(max(0.0, lo) - 1, min(100.0, hi) + 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)  # a sweep after the table: figures would pile up in pyplot's registry


def run_sweep(cfg: D2FConfig, skips, adds, student, tokenizer, problems, blocks=None) -> list[dict]:
    """The student over the block size x skip_threshold x block_add_threshold grid (block sizes:
    ``blocks``, default cfg's), the rest of ``cfg`` kept."""
    grid = [(size, skip, add) for size in blocks or (cfg.block_size,) for skip in skips for add in adds]
    methods = {f"block={size} skip={skip} add={add}": Method(_diffusion(student, dataclasses.replace(
        cfg, block_size=size, skip_threshold=skip, block_add_threshold=add), "d2f"), tokenizer)
        for size, skip, add in grid}
    res = evaluate(methods, problems, "sweep")
    return [dict(block_size=size, skip_threshold=skip, block_add_threshold=add,
                 **{k: v for k, v in s.items() if k != "records"}) for (size, skip, add), s in zip(grid, res.values())]


def train_smoke(folder: str) -> dict[str, str]:
    """The recipe's models, tiny and a few steps each: the AR baseline (with its tokenizer), the
    teacher adapted from it and the fully fine-tuned student; well-formed checkpoints, not accurate."""
    from d2f_recipe import adapt_ar, distill, train_ar

    # So few steps at so low a rate that the teacher does not yet fill its canvas with EOS: the
    # decoders then generate all max_new_tokens, and kernel path vs reference loop compares them.
    tiny = ["--batch", "8", "--train-size", "64", "--warmup", "2", "--steps", "4", "--lr", "5e-4"]
    paths = {k: os.path.join(folder, k) for k in ("teacher", "ar", "student")}
    train_ar.main(["--out", paths["ar"], "--hidden", "32", "--layers", "2", "--heads", "2", *tiny])
    # The plain objective: with adapt_ar's default shares this tiny model's confidences tie
    # between masked positions to within float rounding, which then decides which one the kernel
    # path and the reference loop force, which is not what the comparison is for.
    adapt_ar.main(["--ar", paths["ar"], "--out", paths["teacher"], "--anneal", "2", "--ar-share", "0",
                   "--semi-ar-share", "0", *tiny])
    distill.main(["--teacher", paths["teacher"], "--out", paths["student"], "--full-finetune", "--steps", "3",
                  "--batch", "4", "--train-size", "8", "--lr", "3e-3", "--warmup", "1", "--device", "cpu"])
    return paths


def check(payload: dict) -> None:
    """Raise ValueError unless the results are well formed: every method, finite numbers,
    accuracy in [0, 1], at least one forward a sequence, and the kernel path decoding exactly
    the reference loop's tokens."""
    rows = payload.get("methods", {})
    missing = [n for n in METHODS if n not in rows]
    if missing:
        raise ValueError(f"methods missing from the results: {missing}")
    for n in METHODS:
        s = rows[n]
        for k in ("accuracy", "step_accuracy", "tokens_per_s", "forwards_per_sequence", "tokens_per_forward", "seconds"):
            if not isinstance(s.get(k), (int, float)) or not math.isfinite(s[k]):
                raise ValueError(f"{n}: {k} is not a finite number: {s.get(k)!r}")
        for k in ("accuracy", "step_accuracy"):
            if not 0.0 <= s[k] <= 1.0:
                raise ValueError(f"{n}: {k} {s[k]} outside [0, 1]")
        if s["seconds"] <= 0 or len(s["records"]) != s["problems"]:
            raise ValueError(f"{n}: {len(s['records'])} records for {s['problems']} problems in {s['seconds']} s")
        if any(r["forwards"] < 1 for r in s["records"]):
            raise ValueError(f"{n}: a sequence took no forward")
    if not payload["kernel_equals_reference"]:
        raise ValueError("the kernel path and the reference loop decoded different tokens")


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.smoke and not a.threads:
        # Tiny models gain nothing from threads, and on shared CI cores a second OpenMP thread
        # waiting for a busy core makes each small matmul ~100x slower.
        a.threads = 1
    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="d2f_e2e_")
        paths = train_smoke(tmp.name)
        a.teacher, a.student, a.student_adapter, a.ar = paths["teacher"], paths["student"], None, paths["ar"]
        a.problems = min(a.problems, 3)
        a.sweep_skip, a.sweep_add = a.sweep_skip[:2], a.sweep_add[:2]
        a.sweep = True  # the sweep's code path runs in CI too, on a 2 x 2 grid
    try:
        with torch_threads(a.threads):
            return _run(a)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(a) -> dict:
    problems = task_math.problems("test", a.problems, a.seed, a.level)
    methods, models, s_tok, cfg, fast = load_methods(a)
    student = models["student"]
    rows = evaluate(methods, problems, "e2e")
    same = [r["ids"] for r in rows["d2f"]["records"]] == [r["ids"] for r in rows["d2f-reference"]["records"]]
    r = ratios(rows)
    pairs = {f"d2f_vs_{o}": paired(rows["d2f"], rows[o]) for o in PAIRED_WITH}
    report(rows, r, pairs)
    print(f"kernel path == reference loop on every problem: {same}")
    print("D2F student settings: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in THRESHOLDS))
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    payload = dict(env=environment(), args=vars(a), d2f_config=dataclasses.asdict(cfg),
                   fast_dllm_config=dataclasses.asdict(fast), methods=rows, ratios=r,
                   paired=pairs,
                   kernel_equals_reference=same, params=params)
    write_json(os.path.join(a.out, "e2e.json"), payload)
    write_markdown(os.path.join(a.out, "e2e.md"), HEADER, table_rows(rows, rows["ar"]["tokens_per_s"]))
    plot(rows, os.path.join(a.out, "e2e.png"), f"{a.problems} held-out problems, batch 1, "
         f"threads={torch.get_num_threads()}")
    if a.sweep:
        sweep = run_sweep(cfg, a.sweep_skip, a.sweep_add, student, s_tok, problems)
        write_json(os.path.join(a.out, "sweep.json"), dict(env=payload["env"], args=payload["args"], rows=sweep))
        cells = [table_rows({"": s}, rows["ar"]["tokens_per_s"])[0][1:] for s in sweep]
        write_markdown(os.path.join(a.out, "sweep.md"), ["skip_threshold", "block_add_threshold"] + HEADER[1:],
                       [[s["skip_threshold"], s["block_add_threshold"]] + c for s, c in zip(sweep, cells)])
        plot_sweep(sweep, os.path.join(a.out, "sweep.png"))
        payload["sweep"] = sweep
    if a.smoke:
        check(payload)
        print("smoke: outputs well formed")
    print(f"wrote {a.out}/e2e.json, e2e.md, e2e.png" + (", sweep.json, sweep.md, sweep.png" if a.sweep else ""))
    return payload


if __name__ == "__main__":
    main()
