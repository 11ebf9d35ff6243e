"""A small BPE tokenizer for the math task, saved where transformers.AutoTokenizer finds it.

Digits are always single tokens (a number's digits, not a merged number, so that a small model
can learn carrying), words merge into whole-word tokens, and spaces are kept as a word prefix so
that decoding gives back the exact text. The special tokens come first, with the chat tokens of
the project's tiny tokenizer, so that their ids are small and fixed. The chat template asks a
question the way the task's prompts do.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

from d2f_bench.tiny import SPECIAL_TOKENS
from d2f_recipe import task_math

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
EOS, MASK, UNK, PAD = "<|endoftext|>", "<|mask|>", "<unk>", "<|pad|>"


def build_tokenizer(folder: str, texts: Iterable[str], vocab_size: int = 512, max_len: int = 512) -> None:
    """Train on ``texts`` and save tokenizer.json and tokenizer_config.json in ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + [PAD]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        # A digit keeps the space before it: "▁4" starts a number, "4" continues one.
        pre_tokenizers.Split(Regex("\u2581?[0-9]"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[.,?!]"), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   mask_token=MASK, unk_token=UNK, model_max_length=max_len,
                                   padding_side="left")
    fast.chat_template = task_math.CHAT_TEMPLATE
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)


def task_texts(n: int, seed: int = 0, level: str = "gsm") -> list[str]:
    """Prompt and solution texts of ``n`` training problems: the tokenizer's training corpus."""

    out = []
    for p in task_math.problems("train", n, seed, level):
        out += [task_math.format_prompt(p.question), p.solution]
    return out


def load_or_build(folder: str, source: str | None = None, seed: int = 0, vocab_size: int = 512,
                  corpus: int = 20000, level: str = "gsm"):
    """The tokenizer of ``folder``: copied from ``source`` when given (so that several models
    share one tokenizer), kept if ``folder`` already has one (a resumed run), else trained."""
    from transformers import AutoTokenizer

    if source:
        copy_tokenizer(source, folder)
    elif not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        build_tokenizer(folder, task_texts(corpus, seed, level), vocab_size)
    return AutoTokenizer.from_pretrained(folder)


def check_tokenizer(folder: str) -> None:
    """Raise ValueError unless ``folder`` holds a tokenizer.json to copy: without one a copy would
    leave the model a partial tokenizer or none."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{folder} holds no tokenizer.json")


def copy_tokenizer(src: str, dst: str) -> None:
    check_tokenizer(src)
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
