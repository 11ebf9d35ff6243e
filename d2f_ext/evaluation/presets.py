"""The D2F paper's evaluation settings, per model and benchmark, as data.

Taken from the D2F authors' evaluation scripts (LLaDA-8B-Instruct and Dream-7B-Base, each with
its D2F LoRA): shots, generation length, block size and thresholds, and whether prompts go
through the chat template (LLaDA-Instruct: yes, few-shot examples as turns, except HumanEval;
Dream-Base: never). Every run is greedy, bfloat16, with a BOS token. HumanEval runs as
``humaneval_d2f``: no stop strings, then d2f_code_sanitize, as the authors post-process it.
"""

from __future__ import annotations

MODELS = {
    "llada": dict(base="GSAI-ML/LLaDA-8B-Instruct", adapter="SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora",
                  chat=True),
    "dream": dict(base="Dream-org/Dream-v0-Base-7B", adapter="SJTU-Deng-Lab/D2F_Dream_Base_7B_Lora",
                  chat=False),
}

# (model, lm-eval task, shots, max_new_tokens, block_size, block_add_threshold,
#  decoded_token_threshold, skip_threshold)
_ROWS = [
    ("llada", "gsm8k", 4, 512, 64, 0.7, 0.95, 0.9),
    ("llada", "minerva_math", 0, 512, 32, 0.1, 0.95, 0.9),
    ("llada", "humaneval_d2f", 0, 512, 32, 0.1, 0.95, 0.9),
    ("llada", "mbpp", 3, 512, 32, 0.9, 0.95, 0.9),
    ("dream", "gsm8k_cot", 8, 256, 32, 0.1, 0.95, 0.9),
    ("dream", "minerva_math", 4, 256, 64, 0.1, 0.95, 0.9),
    ("dream", "humaneval_d2f", 0, 256, 32, 0.9, 0.95, 0.95),
    ("dream", "mbpp", 3, 256, 48, 0.1, 0.95, 0.9),
]


def _preset(model, task, shots, length, block, add, act, skip) -> dict:
    chat = MODELS[model]["chat"] and task != "humaneval_d2f"
    return dict(
        model=model, base_model=MODELS[model]["base"], adapter=MODELS[model]["adapter"], task=task,
        num_fewshot=shots, apply_chat_template=chat, fewshot_as_multiturn=chat and shots > 0,
        model_args=dict(dtype="bfloat16", add_bos_token=True, max_new_tokens=length, block_size=block,
                        block_add_threshold=add, decoded_token_threshold=act, skip_threshold=skip))


PRESETS: dict[str, dict] = {f"{r[0]}-{r[1].removesuffix('_d2f')}": _preset(*r) for r in _ROWS}


def table() -> str:
    """The presets as a markdown table (for the README)."""
    head = ["preset", "task", "shots", "chat template", "max_new_tokens", "block_size",
            "block_add_threshold", "decoded_token_threshold", "skip_threshold"]
    rows = []
    for name, p in PRESETS.items():
        m = p["model_args"]
        chat = ("yes, few-shot as turns" if p["fewshot_as_multiturn"] else "yes") if p["apply_chat_template"] else "no"
        rows.append([name, p["task"], p["num_fewshot"], chat, m["max_new_tokens"], m["block_size"],
                     m["block_add_threshold"], m["decoded_token_threshold"], m["skip_threshold"]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
