"""Loading checkpoints (safetensors only) and merging PEFT LoRA adapters into them."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Union

import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .diffusion_lm import DiffusionLM
from .dream import DreamModel
from .llada import LLaDAModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint or adapter whose content does not fit the model."""


def check_device(name: str, arg: str = "--device") -> torch.device:
    """The device, or a ValueError naming ``arg`` (the caller's name for the setting) when it
    does not exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{arg} {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg} {name}: no CUDA GPU is available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{arg} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_dtype(dtype, arg: str = "dtype") -> torch.dtype:
    """One of :data:`DTYPES`, given as the torch dtype or its name; else a ValueError naming ``arg``."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"{arg} must be one of {sorted(DTYPES)} (a name or the torch dtype), got {dtype!r}")


def model_for_config(config: ModelConfig) -> DiffusionLM:
    """An initialised (random) model for ``config``, on the current default device."""
    return {"llada": LLaDAModel, "dream": DreamModel}[config.arch](config)


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{INDEX_FILE} lists {os.path.basename(path)}, which is missing from {folder}")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    pickled = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
    hint = ""
    if pickled:
        hint = f" (found {', '.join(sorted(pickled))}: only safetensors weights are loaded, never pickle)"
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _get(f, path: str, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from None


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value))


def load_model(folder: str, dtype: Union[torch.dtype, str] = torch.float32, device="cpu") -> DiffusionLM:
    """The LLaDA or Dream model of a checkpoint folder (config.json + model.safetensors, or
    shards with model.safetensors.index.json), in ``dtype`` on ``device``, in eval mode.

    The module is built on the meta device and each tensor is read, converted and assigned in
    turn, so that peak memory stays near one copy of the weights.
    """
    folder = os.fspath(folder)
    dtype, device = check_dtype(dtype), check_device(str(device), "device")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = ModelConfig.from_file(folder)
    files = _weight_files(folder)
    with torch.device("meta"):
        model = model_for_config(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # Tied checkpoints may still carry the head; it is the embedding, so it is not needed.
    ignored = {"lm_head.weight"} if config.arch == "dream" and config.tie_word_embeddings else set()
    seen: set[str] = set()
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                # Older Qwen2/LLaMA-style exports also save RoPE's frequencies, a buffer computed
                # from config.json; transformers skips them too.
                if name in ignored or name.endswith("rotary_emb.inv_freq"):
                    continue
                if name not in expected:
                    raise CheckpointError(f"unexpected tensor {name!r} in {path}: not a parameter of "
                                          f"this {config.arch} model")
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} appears twice (again in {path})")
                t = _get(f, path, name)
                if tuple(t.shape) != expected[name]:
                    raise CheckpointError(f"tensor {name!r} in {path} has shape {tuple(t.shape)}, but "
                                          f"config.json implies {expected[name]}")
                _assign(model, name, t.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {folder} lacks tensors: {shown}")
    return model.eval()


def _from_pattern(patterns: dict, module: str, default):
    # PEFT's per-module overrides: a key matches a module path that ends with it.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(folder: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {folder} (only safetensors adapters are loaded)")
    try:
        with open(config_path, encoding="utf-8") as f:
            acfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(acfg, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    for key in ("r", "lora_alpha"):
        if not isinstance(acfg.get(key), (int, float)) or isinstance(acfg.get(key), bool) or acfg[key] <= 0:
            raise CheckpointError(f"{ADAPTER_CONFIG} needs a positive {key}, got {acfg.get(key)!r}")
    if acfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"adapter type {acfg.get('peft_type')!r} is not supported (LoRA only)")
    for option in ("use_dora", "lora_bias", "modules_to_save"):
        if acfg.get(option):
            raise CheckpointError(f"adapter option {option}={acfg[option]!r} is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with _open(weights_path) as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise CheckpointError(f"adapter tensor {key!r} is not a LoRA A/B weight")
            pairs.setdefault(m[1], {})[m[2]] = _get(f, weights_path, key)
    if not pairs:
        raise CheckpointError(f"{weights_path} holds no LoRA weights")
    return acfg, pairs


def check_adapter(model: DiffusionLM, folder: str) -> list:
    """Raise CheckpointError unless the adapter in ``folder`` fits ``model`` (a model on the meta
    device will do: only the layer shapes are read), naming what differs: the model type (a
    target layer this architecture lacks), the vocabulary or the hidden size. Returns the merge
    plan: (layer, A, B, scale) per target."""
    folder = os.fspath(folder)
    acfg, pairs = _read_adapter(folder)
    modules = dict(model.named_modules())
    base = acfg.get("base_model_name_or_path")
    made_for = f" (made for {base})" if base else ""
    plan = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter for {name!r} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"adapter targets {name!r}, which this {model.config.arch} model does "
                                  f"not have as a linear layer: model type differs (an adapter for another "
                                  f"base model?){made_for}")
        a, b = ab["A"], ab["B"]
        r = int(_from_pattern(acfg.get("rank_pattern"), name, acfg["r"]))
        if a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            differs = _differs(model.config, (a.shape[1], b.shape[0]), (module.in_features, module.out_features))
            raise CheckpointError(
                f"adapter for {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the layer is "
                f"{module.out_features}x{module.in_features} with r={r}: {differs} (an adapter for "
                f"another base model?){made_for}")
        alpha = float(_from_pattern(acfg.get("alpha_pattern"), name, acfg["lora_alpha"]))
        plan.append((module, a, b, alpha / (math.sqrt(r) if acfg.get("use_rslora") else r)))
    return plan


def _differs(config, got: tuple[int, int], want: tuple[int, int]) -> str:
    """Which model dimension an adapter's (in, out) widths contradict, by the model's names."""
    named = {config.vocab_size: "vocabulary size", config.hidden_size: "hidden size"}
    parts = [f"{named.get(w, side + ' width')} {g} in the adapter vs {w} in the model"
             for g, w, side in zip(got, want, ("input", "output")) if g != w]
    return "; ".join(parts) or "rank differs from adapter_config.json's r"


def load_adapter(model: DiffusionLM, folder: str) -> DiffusionLM:
    """Merge a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into the
    model's weights in place: W += scale * B @ A, scale = lora_alpha / r (/ sqrt(r) with
    use_rslora). Everything is checked before any weight changes."""
    plan = check_adapter(model, folder)
    # fan_in_fan_out only describes Conv1D-style [in, out] base weights; every target here is an
    # nn.Linear [out, in], which B @ A already matches (PEFT itself forces the flag off for Linear).
    with torch.no_grad():
        for module, a, b, scale in plan:
            w = module.weight
            delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scale
            w.copy_((w.float() + delta).to(w.dtype))
    return model
