"""d2f-eval and the lm-eval model ``d2f``, for real and offline: the package's d2f_math task on the
shipped model scores what d2f_recipe.evaluate's own scoring computes; two processes under torchrun score
what one does; bad input is one line before any model work; the HumanEval filter and presets."""

import argparse
import glob
import io
import json
import os
import pathlib
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

import d2f_ext
from d2f_bench.tiny import write_tiny_checkpoint
from d2f_ext import cli as generate_cli
from d2f_ext.evaluation import PRESETS, TASKS_DIR, cli
from d2f_ext.evaluation.filters import sanitize
from d2f_ext.evaluation.model import D2FLM
from d2f_ext.evaluation.presets import table
from d2f_ext.models import ModelConfig, load_model
from d2f_recipe import evaluate, task_math

SHIPPED = generate_cli.DEFAULT_MODEL
PROBLEMS = 6  # a handful: each takes well under a second on one CPU thread


def _env():
    # The children import the d2f_ext this test imported (the installed one, with its compiled
    # kernels, or the source tree's when run from the repository root).
    package_root = str(pathlib.Path(d2f_ext.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=package_root, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # One thread a process: on a shared CPU a second OpenMP thread waiting for a busy core makes
    # the small model's matmuls far slower, and the two-process run has one core each.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _d2f_eval(launcher: list[str], out: pathlib.Path, model_args: str) -> tuple[dict, dict]:
    """Run d2f-eval on the first PROBLEMS problems of d2f_math; (lm-eval results, speed JSON)."""
    cmd = launcher + ["-m", "d2f_ext.evaluation.cli", "--model_args", model_args, "--tasks", "d2f_math",
                      "--limit", str(PROBLEMS), "--output_path", str(out)]
    run = subprocess.run(cmd, cwd=out.parent, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = glob.glob(str(out / "*" / "results_*.json"))
    speed = glob.glob(str(out / "*" / "d2f_speed_*.json"))
    assert len(results) == 1 and len(speed) == 1, (results, speed)
    assert "[d2f-eval] total" in run.stderr
    with open(results[0]) as f, open(speed[0]) as g:
        return json.load(f), json.load(g)


@pytest.fixture(scope="module")
def bench_scores():
    """d2f_recipe.evaluate's scoring of the D2F student on the same problems and settings: its
    generation_config block size and thresholds, max_new_tokens 64, batch 1."""
    a = argparse.Namespace(block_size=None, student=SHIPPED, max_new_tokens=64, block_add_threshold=None,
                           decoded_token_threshold=None, skip_threshold=None)
    cfg = evaluate.d2f_config(a, SHIPPED)
    from transformers import AutoTokenizer

    student = load_model(SHIPPED).eval()
    method = evaluate.Method(evaluate._diffusion(student, cfg, "d2f"),
                              AutoTokenizer.from_pretrained(SHIPPED))
    problems = task_math.problems("test", PROBLEMS, seed=0, level="small")
    return evaluate.evaluate({"d2f": method}, problems, "bench")["d2f"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1") / "out"
    return _d2f_eval([sys.executable], out, f"pretrained={SHIPPED}")


def test_task_data_is_the_evaluation_held_out_problems():
    with open(os.path.join(TASKS_DIR, "d2f_math", "d2f_math_test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    problems = task_math.problems("test", 100, seed=0, level="small")  # d2f_recipe.evaluate's defaults
    assert [(r["question"], r["answer"]) for r in rows] == [(p.question, p.answer) for p in problems]


def test_export_writes_the_package_task_data(tmp_path):
    from d2f_recipe import export_eval_task

    assert os.path.samefile(export_eval_task.OUT, os.path.join(TASKS_DIR, "d2f_math", "d2f_math_test.jsonl"))
    export_eval_task.main(["--problems", "100", "--out", str(tmp_path / "data.jsonl")])
    with open(export_eval_task.OUT) as shipped:
        assert (tmp_path / "data.jsonl").read_text() == shipped.read()


def test_package_tasks_are_found_by_name():
    from lm_eval.tasks import TaskManager

    names = TaskManager(include_path=TASKS_DIR, include_defaults=False).all_tasks
    assert {"d2f_math", "humaneval_d2f"} <= set(names)


def test_d2f_eval_scores_as_the_recipe_evaluation(one_process, bench_scores):
    results, speed = one_process
    score = results["results"]["d2f_math"]["exact_match,answer"]
    assert results["results"]["d2f_math"]["sample_len"] == PROBLEMS
    assert score == pytest.approx(bench_scores["accuracy"])
    # Greedy, batch 1, the same settings: the same tokens, hence the same counts.
    (run,) = speed["runs"]
    assert run["world_size"] == 1
    with open(os.path.join(SHIPPED, "generation_config.json")) as f:
        tuned = json.load(f)
    for key in ("block_size", "skip_threshold"):  # the checkpoint's tuned settings, not D2FConfig's
        assert run["settings"][key] == tuned[key]
    total = run["total"]
    assert total["requests"] == PROBLEMS
    assert total["generated_tokens"] == bench_scores["generated_tokens"]
    assert total["forwards"] == bench_scores["forwards"]
    assert total["tokens_per_forward"] == pytest.approx(total["generated_tokens"] / total["forwards"])
    assert total["seconds"] > 0 and total["tokens_per_s"] == pytest.approx(total["generated_tokens"] / total["seconds"])


def test_two_processes_score_as_one(one_process, tmp_path):
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "out"
    # batch_size 2: each rank also batches its three requests (left-padded, sorted by length).
    results, speed = _d2f_eval([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", "29531"], out, f"pretrained={SHIPPED},batch_size=2")
    single, single_speed = one_process
    assert results["results"]["d2f_math"]["sample_len"] == PROBLEMS
    assert results["results"]["d2f_math"]["exact_match,answer"] == single["results"]["d2f_math"]["exact_match,answer"]
    (run,) = speed["runs"]
    assert run["world_size"] == 2 and [r["rank"] for r in run["ranks"]] == [0, 1]
    assert [r["requests"] for r in run["ranks"]] == [PROBLEMS // 2] * 2
    assert run["total"]["generated_tokens"] == single_speed["runs"][0]["total"]["generated_tokens"]
    assert run["total"]["generated_tokens"] == sum(r["generated_tokens"] for r in run["ranks"])
    assert run["total"]["seconds"] == max(r["seconds"] for r in run["ranks"])


# --- bad input: one line, exit 2, no model loaded ----------------------------------------------

def _make_adapter(base_folder: str, folder: str, targets) -> str:
    peft = pytest.importorskip("peft")
    model = load_model(base_folder)
    # LoRA weights only: on a head named lm_head PEFT would also save the base weight by default.
    peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)).save_pretrained(
        folder, save_embedding_layers=False)
    return folder


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("d2f_ext.evaluation.model.AutoD2FModel.from_pretrained", refuse)


def _fails(model_args: str, *needles: str) -> None:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert cli.main(["--model_args", model_args, "--tasks", "d2f_math"]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("d2f-eval: error:"), err.getvalue()
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_model_args_are_one_line_before_any_model_work(tmp_path, no_model_load):
    _fails(f"pretrained={tmp_path / 'missing'}", "pretrained", "does not exist")
    _fails(f"pretrained={SHIPPED},adapter={tmp_path / 'missing'}", "adapter", "does not exist")
    _fails(f"pretrained={SHIPPED},lora_path={tmp_path}", "adapter_config.json")
    _fails(f"pretrained={SHIPPED},block_sise=16", "unknown key", "block_sise")
    _fails(f"pretrained={SHIPPED},skip_threshold=1.5", "skip_threshold", "[0, 1]")
    _fails(f"pretrained={SHIPPED},block_add_threshold=-0.1", "block_add_threshold")
    _fails(f"pretrained={SHIPPED},decoder=beam", "decoder")
    _fails(f"pretrained={SHIPPED},max_new_tokens=0", "max_new_tokens")
    _fails("block_size=16", "pretrained")
    bare = write_tiny_checkpoint(str(tmp_path / "bare"), tokenizer=False)
    _fails(f"pretrained={bare}", "no tokenizer files")


@pytest.mark.parametrize("arg, message", [
    ("batch_size=inf", "batch_size must be an integer, got inf"),
    ("max_new_tokens=nan", "max_new_tokens must be an integer, got nan"),
    ("device=nope", "device 'nope'"),
])
def test_bad_number_or_device_is_one_line_naming_it(arg, message, no_model_load):
    _fails(f"pretrained={SHIPPED},{arg}", f"d2f model_args: {message}")


def test_adapter_for_another_base_model_says_what_differs(tmp_path, no_model_load):
    shipped = ModelConfig.from_file(SHIPPED)
    arch, other = shipped.arch, {"llada": "dream", "dream": "llada"}[shipped.arch]
    head = {"llada": r"model\.transformer\.ff_out", "dream": "lm_head"}[arch]
    attn_out = {"llada": "attn_out", "dream": "o_proj"}
    narrow = write_tiny_checkpoint(str(tmp_path / "narrow"), arch=arch, hidden_size=128, tokenizer=False)
    _make_adapter(narrow, str(tmp_path / "a_narrow"), ["q_proj"])
    _fails(f"pretrained={SHIPPED},adapter={tmp_path / 'a_narrow'}",
           f"hidden size 128 in the adapter vs {shipped.hidden_size}")
    vocab = write_tiny_checkpoint(str(tmp_path / "vocab"), arch=arch, hidden_size=shipped.hidden_size,
                                  num_heads=shipped.num_heads, vocab=128, tokenizer=False)
    _make_adapter(vocab, str(tmp_path / "a_vocab"), head)
    _fails(f"pretrained={SHIPPED},adapter={tmp_path / 'a_vocab'}",
           f"vocabulary size 128 in the adapter vs {shipped.vocab_size}")
    wrong = write_tiny_checkpoint(str(tmp_path / "other"), arch=other, hidden_size=shipped.hidden_size,
                                  num_heads=shipped.num_heads, tokenizer=False)
    _make_adapter(wrong, str(tmp_path / "a_other"), [attn_out[other]])
    _fails(f"pretrained={SHIPPED},adapter={tmp_path / 'a_other'}", "model type differs")


def _local_task(folder: pathlib.Path, name: str, *replacements: tuple[str, str]) -> None:
    """A variant of d2f_math in ``folder``: its data by absolute path, the given text replaced."""
    yaml = open(os.path.join(TASKS_DIR, "d2f_math", "d2f_math.yaml")).read()
    data = os.path.join(TASKS_DIR, "d2f_math", "d2f_math_test.jsonl")
    yaml = yaml.replace("task: d2f_math", f"task: {name}").replace(
        "custom_dataset: !function d2f_math_data.load", f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(data)}")
    for old, new in replacements:
        assert old in yaml
        yaml = yaml.replace(old, new)
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml)


def test_loglikelihood_task_is_refused_with_the_alternative(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _local_task(tmp_path, "d2f_math_loglikelihood", ("output_type: generate_until", "output_type: loglikelihood"),
                ('doc_to_target: "{{answer}}"', 'doc_to_target: " {{solution}}"'))
    lm = D2FLM(pretrained=SHIPPED)
    with pytest.raises(ValueError, match=r"D2F is a generation method.*generate_until tasks, e\.g\. gsm8k"):
        simple_evaluate(model=lm, tasks=["d2f_math_loglikelihood"], limit=2,
                        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))


def test_apply_chat_template_run_scores_as_the_recipe_evaluation(tmp_path, bench_scores):
    """d2f_math with the bare question as the document: --apply_chat_template's rendering through
    the shipped tokenizer's template gives the recipe evaluation's prompts, hence its score."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "chat"
    _local_task(folder, "d2f_math_chat", ('doc_to_text: "Question: {{question}} Answer:"', 'doc_to_text: "{{question}}"'))
    out = simple_evaluate(model=D2FLM(pretrained=SHIPPED), tasks=["d2f_math_chat"], limit=PROBLEMS,
                          apply_chat_template=True, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    problems = task_math.problems("test", PROBLEMS, seed=0, level="small")
    prompts = [s["arguments"][0][0] for s in sorted(out["samples"]["d2f_math_chat"], key=lambda s: s["doc_id"])]
    assert prompts == [task_math.format_prompt(p.question) for p in problems]
    assert out["results"]["d2f_math_chat"]["exact_match,answer"] == pytest.approx(bench_scores["accuracy"])


def test_chat_template_is_the_tokenizers():
    lm = D2FLM(pretrained=SHIPPED)
    question = "Mia has 3 apples. How many apples does Mia have?"
    assert lm.apply_chat_template([{"role": "user", "content": question}]) == task_math.format_prompt(question)
    assert lm.chat_template(True) == lm.tokenizer.chat_template and lm.chat_template(False) is None
    assert lm.tokenizer_name.endswith("d2f-math")


def test_task_length_is_honoured_unless_max_new_tokens_is_given(monkeypatch):
    from lm_eval.api.instance import Instance

    def lengths(lm) -> list[int]:
        asked = []
        generate = lm.model.generate

        def spy(*args, **kwargs):
            asked.append(kwargs["max_new_tokens"])
            return generate(*args, **kwargs)

        monkeypatch.setattr(lm.model, "generate", spy)
        # lm-eval's aliases of a task's length, and none (generation_config.json's 64).
        gen_kwargs = [{"max_gen_toks": 8}, {"max_completion_tokens": 8}, {"max_tokens": 8}, {}]
        lm.generate_until([Instance("generate_until", {}, ("Question: 1 + 1? Answer:", {"until": [], **g}), i)
                           for i, g in enumerate(gen_kwargs)], disable_tqdm=True)
        return sorted(asked)

    assert lengths(D2FLM(pretrained=SHIPPED)) == [8, 8, 8, 64]  # one batch each (batch_size 1)
    assert lengths(D2FLM(pretrained=SHIPPED, max_new_tokens=16)) == [16] * 4



@pytest.mark.parametrize("decoder", ["d2f", "fast-dllm", "vanilla"])
def test_each_decoder_runs_and_leaves_the_model_usable(decoder):
    from lm_eval.api.instance import Instance

    lm = D2FLM(pretrained=SHIPPED, decoder=decoder)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": generate_cli.DEFAULT_PROMPT}],
                                              tokenize=False, add_generation_prompt=True)
    (text,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": []}), 0)], disable_tqdm=True)
    assert text.startswith("Mia starts with 12 apples.")  # the trained solution format
    # The model's engine, built inside the run, serves a plain generate afterwards.
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert lm.model.generate(ids).shape[1] > ids.shape[1]

# --- HumanEval's code filter -------------------------------------------------------------------

PROMPT = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Sum."""\n'


@pytest.mark.parametrize("completion, want", [
    # A body, then what a diffusion model writes after it: a call and a second function.
    ("    return a + b\n\nprint(add(1, 2))\nassert add(1, 1) == 2\n",
     PROMPT + "    return a + b\n"),
    # A fenced block holding the whole function: the prompt's imports, then the block's code.
    ("Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.",
     "from typing import List\ndef add(a, b):\n    return a + b\n"),
    # A helper the solution needs is kept; text that stops parsing is cut.
    ("    return helper(a) + b\n\n\ndef helper(x):\n    return x\n\nThis function adds",
     PROMPT + "    return helper(a) + b\n\n\ndef helper(x):\n    return x\n"),
    # The body, then a second attempt at the whole function: still the prompt's program.
    ("    return a + b\n\n\ndef add(a, b):\n    return b + a\n",
     PROMPT + "    return a + b\n\n\ndef add(a, b):\n    return b + a\n"),
])
def test_sanitize_keeps_the_program_that_defines_the_entry_point(completion, want):
    got = sanitize(PROMPT, completion, "add")
    assert got == want
    namespace = {}
    exec(got, namespace)  # noqa: S102 - the strings above
    assert namespace["add"](2, 3) == 5


# --- presets ------------------------------------------------------------------------------------

def test_presets_hold_the_published_settings():
    assert set(PRESETS) == {f"{m}-{t}" for m, ts in (("llada", ("gsm8k", "minerva_math", "humaneval", "mbpp")),
                                                    ("dream", ("gsm8k_cot", "minerva_math", "humaneval", "mbpp")))
                            for t in ts}
    assert all(p["model_args"]["decoded_token_threshold"] == 0.95 for p in PRESETS.values())
    g = PRESETS["llada-gsm8k"]
    assert (g["model_args"]["block_size"], g["model_args"]["block_add_threshold"], g["num_fewshot"]) == (64, 0.7, 4)
    assert g["apply_chat_template"] and g["fewshot_as_multiturn"]
    assert PRESETS["llada-mbpp"]["model_args"]["block_add_threshold"] == 0.9
    h = PRESETS["dream-humaneval"]
    assert h["task"] == "humaneval_d2f" and not h["apply_chat_template"]
    assert (h["model_args"]["block_add_threshold"], h["model_args"]["skip_threshold"]) == (0.9, 0.95)
    assert [PRESETS[f"dream-{t}"]["model_args"]["block_size"] for t in ("gsm8k_cot", "mbpp", "minerva_math")] == [32, 48, 64]
    assert len(table().splitlines()) == 2 + len(PRESETS)


@pytest.mark.parametrize("command", [[], ["run"]])
def test_preset_fills_what_the_command_line_leaves_out(command):
    from lm_eval._cli.harness import HarnessCLI

    argv = cli.apply_preset(command + ["--model_args", "pretrained=/ckpt,block_size=16", "--limit", "5"],
                            "llada-gsm8k")
    args = HarnessCLI()._parser.parse_args(argv if command else ["run"] + argv)  # d2f-eval adds run
    # lm-eval merges repeated --model_args left to right: the user's, given after, win.
    assert args.model_args == {**PRESETS["llada-gsm8k"]["model_args"], "pretrained": "/ckpt", "block_size": 16}
    assert (args.tasks, args.num_fewshot, args.limit) == (["gsm8k"], 4, 5)
    assert args.apply_chat_template is True and args.fewshot_as_multiturn is True
    mine = cli.apply_preset(["--tasks", "gsm8k_cot", "--num_fewshot", "8"], "llada-gsm8k")
    assert mine.count("--tasks") == 1 and mine.count("--num_fewshot") == 1
    with pytest.raises(ValueError, match="unknown preset"):
        cli.apply_preset([], "llada-hellaswag")


def test_each_run_writes_only_its_own_speed(tmp_path, monkeypatch):
    from lm_eval._cli.harness import HarnessCLI

    from d2f_ext.evaluation.model import SPEED_RUNS

    def execute(self, args):  # lm-eval's run, as far as d2f-eval sees it
        SPEED_RUNS.append({"output_path": args.output_path})
        folder = pathlib.Path(args.output_path) / "model"
        folder.mkdir(parents=True)
        (folder / "results_1.json").write_text("{}")

    monkeypatch.setattr(HarnessCLI, "execute", execute)
    for run in ("first", "second"):
        with redirect_stderr(io.StringIO()):
            assert cli.main(["--model_args", f"pretrained={SHIPPED}", "--tasks", "d2f_math",
                             "--output_path", str(tmp_path / run)]) == 0
        with open(tmp_path / run / "model" / "d2f_speed_1.json") as f:
            assert json.load(f)["runs"] == [{"output_path": str(tmp_path / run)}]


def test_preset_without_checkpoint_names_what_to_download():
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert cli.main(["--preset", "dream-humaneval"]) == 2
    assert "Dream-org/Dream-v0-Base-7B" in err.getvalue() and "D2F_Dream_Base_7B_Lora" in err.getvalue()
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["--list-presets"]) == 0
    assert out.getvalue().strip() == table()
