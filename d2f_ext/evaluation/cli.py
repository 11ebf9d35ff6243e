"""d2f-eval: lm-evaluation-harness's own command line with the model ``d2f`` and this package's
tasks (d2f_math, humaneval_d2f) registered. Every lm-eval flag passes through; ``--model``
defaults to d2f. Extra flags: ``--preset NAME`` fills model_args, tasks, shots and chat-template
flags from the D2F paper's settings (flags given win), ``--list-presets`` prints them.

    d2f-eval --model_args pretrained=CKPT --tasks d2f_math --output_path out
    torchrun --nproc_per_node 2 -m d2f_ext.evaluation.cli --model_args pretrained=CKPT --tasks d2f_math

Speed statistics (generated tokens, wall time, tokens/s, forwards, tokens per forward; per rank
and in total) are printed and, with --output_path, written as d2f_speed_<time>.json beside
lm-eval's results_<time>.json.
"""

from __future__ import annotations

import glob
import json
import os
import sys



def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _take(argv: list[str], flag: str):
    """Remove ``flag VALUE`` (or ``flag=VALUE``) from argv; its value, or None."""
    for i, a in enumerate(argv):
        if a == flag:
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def apply_preset(argv: list[str], name: str) -> list[str]:
    """argv with the preset's settings added where argv does not set them; the preset's
    model_args go first (after a leading subcommand such as ``run``), so that --model_args
    given after them win."""
    from .presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    out = list(argv)
    model_args = ",".join(f"{k}={v}" for k, v in p["model_args"].items())
    # argparse takes the subcommand only as the first argument: before it, "run" would be read
    # as a --model_args value.
    at = 1 if argv and not argv[0].startswith("-") else 0
    out[at:at] = ["--model_args", model_args]
    if not _has(argv, "--tasks") and not _has(argv, "-t"):
        out += ["--tasks", p["task"]]
    if not _has(argv, "--num_fewshot") and not _has(argv, "-f"):
        out += ["--num_fewshot", str(p["num_fewshot"])]
    for flag, on in (("--apply_chat_template", p["apply_chat_template"]),
                     ("--fewshot_as_multiturn", p["fewshot_as_multiturn"])):
        if on and not _has(argv, flag):
            out.append(flag)
    return out


def _results_files(output_path: str) -> dict[str, float]:
    """lm-eval's results files under ``output_path`` by modification time:
    <path>/<model>/results_<time>.json, or <stem>_<time>.json beside an output_path ending in .json."""
    if output_path.endswith(".json"):
        stem = os.path.splitext(output_path)[0]
        found = glob.glob(f"{glob.escape(stem)}_*.json")
    else:
        found = glob.glob(os.path.join(glob.escape(output_path), "**", "results_*.json"), recursive=True)
    return {f: os.path.getmtime(f) for f in found if "d2f_speed" not in os.path.basename(f)}


def write_speed(output_path: str, before: dict[str, float], runs: list[dict]):
    """Write the speed statistics beside the results file this run wrote (one not in ``before``,
    the files there before it, or changed since: file times come from a coarse clock, so they
    are not compared with the run's start); returns the path written."""
    new = {f: t for f, t in _results_files(output_path).items() if before.get(f) != t}
    if not new:
        return None
    folder, name = os.path.split(max(new, key=new.get))
    speed = os.path.join(folder, name.replace("results_", "d2f_speed_", 1) if name.startswith("results_")
                         else os.path.splitext(name)[0] + "_d2f_speed.json")
    with open(speed, "w", encoding="utf-8") as f:
        json.dump(dict(results_file=name, runs=runs), f, indent=2)
    return speed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except (ValueError, TypeError, OSError) as e:  # bad arguments or files: one line, no traceback
        print(f"d2f-eval: error: {e}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    if "--list-presets" in argv:
        from .presets import table

        print(table())
        return 0
    preset = _take(argv, "--preset")
    if preset is not None:
        argv = apply_preset(argv, preset)
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    from . import TASKS_DIR
    from .model import SPEED_RUNS, check_model_args

    setup_logging()
    SPEED_RUNS.clear()  # a second main() in this process writes only its own runs
    cli = HarnessCLI()
    commands = cli._subparsers.choices
    if not argv or argv[0] not in commands:
        argv.insert(0, "run")  # as lm-eval's own entry point does for flags without a command
    if argv[0] == "run" and not _has(argv, "--model") and not _has(argv, "-M"):
        argv[1:1] = ["--model", "d2f"]
    args = cli._parser.parse_args(argv)
    if preset is not None and "pretrained" not in (args.model_args or {}):
        from .presets import PRESETS

        p = PRESETS[preset]
        raise ValueError(f"--preset {preset} needs the checkpoints: download {p['base_model']} and {p['adapter']}, "
                         "then pass --model_args pretrained=<base folder>,adapter=<adapter folder>")
    # The package's tasks are found by name, as lm-eval's own; a user's --include_path still applies.
    args.include_path = [TASKS_DIR] + ([args.include_path] if args.include_path else [])
    if args.command == "run" and args.model == "d2f":
        check_model_args(dict(args.model_args or {}))  # fail before lm-eval indexes tasks or loads data
    output_path = getattr(args, "output_path", None)
    before = _results_files(output_path) if output_path else {}
    cli.execute(args)
    if SPEED_RUNS and output_path:
        written = write_speed(output_path, before, SPEED_RUNS)
        if written:
            print(f"[d2f-eval] speed statistics: {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
