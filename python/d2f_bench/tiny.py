"""Writers of small checkpoints: tiny random models with a word-level tokenizer (tests, the README
demo) and the conformance cases' models (their weight recipe, exactly)."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from d2f_ext.models import ModelConfig
from d2f_ext.models.loading import INDEX_FILE, SINGLE_FILE, model_for_config

SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
WORDS = (
    "the a an and or but of to in on at for with from by is are was were be been it this that "
    "these those i you he she we they what which who when where why how yes no not all some many "
    "one two three four five six seven eight nine ten zero plus minus times equals answer number "
    "question cat dog bird fish tree house car book water fire sun moon star day night good bad "
    "big small new old first last next then so if do does did can will say go see make know"
).split() + list("0123456789") + [".", ",", "?", "!", ":", "=", "+", "-"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def llada_config(vocab: int, mask: int, eos: int, hidden_size: int, num_heads: int,
                  num_kv_heads: int, num_layers: int, intermediate_size: int,
                  max_len: int, tie: bool) -> dict:
    return {
        "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False, "bias_for_layer_norm": False, "block_group_size": 1,
        "block_type": "llama", "d_model": hidden_size, "embedding_size": vocab,
        "eos_token_id": eos, "include_bias": False, "include_qkv_bias": False,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": mask, "max_sequence_length": max_len,
        "mlp_hidden_size": intermediate_size, "model_type": "llada", "n_heads": num_heads,
        "n_kv_heads": num_kv_heads, "n_layers": num_layers, "pad_token_id": eos,
        "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "vocab_size": vocab, "weight_tying": tie,
    }


def dream_config(vocab: int, mask: int, eos: int, hidden_size: int, num_heads: int,
                  num_kv_heads: int, num_layers: int, intermediate_size: int,
                  max_len: int, tie: bool) -> dict:
    return {
        "architectures": ["DreamModel"], "bos_token_id": eos, "eos_token_id": eos,
        "hidden_act": "silu", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "mask_token_id": mask, "max_position_embeddings": max_len, "model_type": "Dream",
        "num_attention_heads": num_heads, "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads, "pad_token_id": eos, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": tie,
        "torch_dtype": "float32", "use_sliding_window": False, "vocab_size": vocab,
    }


def _recipe_for(config: dict) -> list[list]:
    """[name, shape, mean, std] per parameter, sorted by name: norms near 1, a wide output head
    (so that a tiny model still makes confident, varied predictions), small everything else."""
    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = model_for_config(cfg)
    recipe = []
    for name, p in sorted(model.named_parameters()):
        if p.dim() == 1 and "norm" in name or name.endswith("ln_f.weight"):
            mean, std = 1.0, 0.1
        elif name in ("lm_head.weight", "model.transformer.ff_out.weight") or (
                cfg.tie_word_embeddings and name in ("model.embed_tokens.weight", "model.transformer.wte.weight")):
            mean, std = 0.0, 1.0
        else:
            mean, std = 0.0, 0.02
        recipe.append([name, list(p.shape), mean, std])
    return recipe


def _draw(seed: int, tensors: list, row_copies: list) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, mean, std in tensors:
        z = rng.standard_normal(size=tuple(shape), dtype=np.float32)
        out[name] = np.float32(mean) + np.float32(std) * z
    for name, row, factor, src in row_copies:
        out[name][row] = np.float32(factor) * out[name][src]
    return out


def _save_weights(folder: str, weights: dict[str, np.ndarray], shards: int) -> None:
    names = list(weights)
    if shards <= 1:
        save_file({n: torch.from_numpy(weights[n]) for n in names}, os.path.join(folder, SINGLE_FILE))
        return
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: torch.from_numpy(weights[n]) for n in group}, os.path.join(folder, fname))
        for n in group:
            weight_map[n] = fname
            total += weights[n].nbytes
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def write_tokenizer(folder: str, vocab_limit: int, max_len: int) -> dict[str, int]:
    """A word-level tokenizer (words first, then the special tokens) that
    ``transformers.AutoTokenizer.from_pretrained(folder)`` loads; returns the special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = WORDS[: max(0, vocab_limit - len(SPECIAL_TOKENS))]
    if not words:
        raise ValueError(f"vocabulary of {vocab_limit} leaves no room for words beside "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    vocab = {w: i for i, w in enumerate(words + SPECIAL_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "unk_token": "<unk>", "padding_side": "left", "chat_template": CHAT_TEMPLATE,
    })
    return {"eos": vocab["<|endoftext|>"], "mask": vocab["<|mask|>"]}


def write_tiny_checkpoint(folder: str, arch: str = "llada", seed: int = 0, vocab: int = 128,
                          shards: int = 2, tokenizer: bool = True, hidden_size: int = 128,
                          num_heads: int = 2, num_kv_heads: Optional[int] = None, num_layers: int = 2,
                          intermediate_size: int = 256, max_len: int = 512, tie: bool = False) -> str:
    """A small random LLaDA or Dream checkpoint in ``folder`` (config.json with the real keys,
    safetensors in ``shards`` files, a tokenizer when asked). Without a tokenizer the mask and
    EOS ids are the last two of the vocabulary. Returns the folder."""
    if arch not in ("llada", "dream"):
        raise ValueError(f"arch must be 'llada' or 'dream', got {arch!r}")
    os.makedirs(folder, exist_ok=True)
    if tokenizer:
        ids = write_tokenizer(folder, vocab, max_len)
    else:
        ids = {"eos": vocab - 2, "mask": vocab - 1}
    kv = num_kv_heads or (num_heads if arch == "llada" else max(1, num_heads // 2))
    make = llada_config if arch == "llada" else dream_config
    config = make(vocab, ids["mask"], ids["eos"], hidden_size, num_heads, kv, num_layers,
                  intermediate_size, max_len, tie)
    _write_json(os.path.join(folder, "config.json"), config)
    _save_weights(folder, _draw(seed, _recipe_for(config), []), shards)
    return folder


def write_conformance_checkpoint(folder: str, case: dict, shards: int = 2) -> str:
    """The model of a conformance case (its ``config`` and ``weights`` recipe), in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), case["config"])
    w = case["weights"]
    _save_weights(folder, _draw(int(w["seed"]), w["tensors"], w.get("row_copies", [])), shards)
    return folder
