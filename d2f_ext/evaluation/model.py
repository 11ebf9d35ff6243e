"""The lm-evaluation-harness model ``d2f``: generate_until through ``model.generate`` (D2F decoding
by default) on checkpoints that AutoD2FModel loads, data parallel under torchrun / accelerate
launch, with the paper's speed statistics (generated tokens, wall time, forwards) per rank."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from ..auto import AutoD2FModel, load_generation_config
from ..models.loading import DTYPES, check_device
from ..config import D2FConfig
from ..generate import DECODERS
from ..models import ModelConfig, check_adapter, model_for_config

log = logging.getLogger(__name__)

D2F_ARGS = ("block_size", "max_new_tokens", "block_add_threshold", "decoded_token_threshold",
            "skip_threshold", "sampling_strategy")
MODEL_ARGS = ("pretrained", "adapter", "lora_path", "dtype", "device", "decoder", *D2F_ARGS,
              "add_bos_token", "batch_size")
# Passed by lm-eval itself (simple_evaluate, --trust_remote_code), not by the user; unused here.
HARNESS_ARGS = ("max_batch_size", "trust_remote_code")
GENERATION_TASKS = "generate_until tasks, e.g. gsm8k, gsm8k_cot, minerva_math, humaneval, mbpp or d2f_math"

# Speed statistics of every generate_until call this process ran as rank 0 (all ranks' numbers
# gathered), read by d2f-eval to write them beside lm-eval's results.
SPEED_RUNS: list[dict] = []


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"d2f model_args: {name} must be an integer, got {value!r}")
    try:
        as_float = float(value)
        whole = int(as_float)
    except (ValueError, OverflowError):  # not a number, nan, inf
        raise TypeError(f"d2f model_args: {name} must be an integer, got {value!r}") from None
    if as_float != whole:
        raise TypeError(f"d2f model_args: {name} must be an integer, got {value!r}")
    return whole


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"d2f model_args: {name} must be a number, got {value!r}") from None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise TypeError(f"d2f model_args: {name} must be true or false, got {value!r}")


def check_model_args(args: dict) -> dict:
    """The model_args, typed and checked without loading any weights: unknown keys, missing
    checkpoint or adapter folders, an adapter made for another base model, settings that
    D2FConfig rejects. Returns them normalised (``lora_path`` folded into ``adapter``)."""
    unknown = sorted(set(args) - set(MODEL_ARGS) - set(HARNESS_ARGS))
    if unknown:
        raise ValueError(f"d2f model_args: unknown key(s) {unknown}; known: {', '.join(MODEL_ARGS)}")
    a = {k: v for k, v in args.items() if k in MODEL_ARGS and v is not None}
    if "lora_path" in a:
        if "adapter" in a and a["adapter"] != a["lora_path"]:
            raise ValueError("d2f model_args: adapter and lora_path (its alias) name different folders")
        a["adapter"] = a.pop("lora_path")
    if "pretrained" not in a:
        raise ValueError("d2f model_args: pretrained=<checkpoint folder> is required")
    for key in ("pretrained", "adapter"):
        if key in a and not os.path.isdir(str(a[key])):
            raise ValueError(f"d2f model_args: {key} folder {a[key]} does not exist")
    if a.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"d2f model_args: dtype must be one of {sorted(DTYPES)}, got {a['dtype']!r}")
    if a.get("decoder", "d2f") not in DECODERS:
        raise ValueError(f"d2f model_args: decoder must be one of {DECODERS}, got {a['decoder']!r}")
    if "device" in a:
        check_device(str(a["device"]), "d2f model_args: device")
    for key in ("block_size", "max_new_tokens", "batch_size"):
        if key in a:
            a[key] = _integer(key, a[key])
    if a.get("batch_size", 1) < 1:
        raise ValueError(f"d2f model_args: batch_size must be >= 1, got {a['batch_size']}")
    for key in ("block_add_threshold", "decoded_token_threshold", "skip_threshold"):
        if key in a:
            a[key] = _number(key, a[key])
    if "add_bos_token" in a:
        a["add_bos_token"] = _flag("add_bos_token", a["add_bos_token"])
    folder = str(a["pretrained"])
    config = ModelConfig.from_file(folder)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"d2f model_args: pretrained folder {folder} has no tokenizer files (tokenizer.json); "
                         "lm-eval's tasks are text")
    try:
        decoding_settings(folder, a)
    except ValueError as e:
        raise ValueError(f"d2f model_args: {e}") from None
    if "adapter" in a:
        with torch.device("meta"):  # shapes only: the weights are read after every check passed
            check_adapter(model_for_config(config), str(a["adapter"]))
    return a


def decoding_settings(folder: str, args: dict) -> D2FConfig:
    """The D2F settings a run decodes with: model_args over the checkpoint's
    generation_config.json over D2FConfig's defaults."""
    # do_sample=False: sampling is per request, from the task's gen_kwargs.
    return D2FConfig.from_generation_config(load_generation_config(folder), do_sample=False,
                                            **{k: args.get(k) for k in D2F_ARGS})


@register_model("d2f")
class D2FLM(LM):
    """lm-eval model ``d2f``. model_args: pretrained (checkpoint folder), adapter / lora_path
    (PEFT LoRA folder merged at load), dtype, device, decoder (d2f, fast-dllm, vanilla,
    reference), block_size, max_new_tokens, block_add_threshold, decoded_token_threshold,
    skip_threshold, sampling_strategy, add_bos_token, batch_size. Decoding settings not given
    come from the checkpoint's generation_config.json. max_new_tokens, when given, is the
    generation length of every request (as in the D2F evaluations); otherwise a task's
    max_gen_toks is."""

    def __init__(self, **model_args):
        super().__init__()
        a = check_model_args(model_args)
        self.args = a
        self.settings = decoding_settings(str(a["pretrained"]), a)
        self.batch_size = a.get("batch_size", 1)
        self.decoder = a.get("decoder", "d2f")
        self.add_bos_token = a.get("add_bos_token", False)
        self._rank, self._world_size = _init_distributed(a.get("device"))
        self._device = torch.device(_device_for_rank(a.get("device")))
        self.model = AutoD2FModel.from_pretrained(str(a["pretrained"]), adapter=a.get("adapter"),
                                                  dtype=DTYPES[a.get("dtype", "float32")], device=self._device)
        self.tokenizer = self.model.tokenizer

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm-eval always passes its --batch_size (default 1) and --device (default cuda:0) here;
        # model_args win, and the default device falls back to the CPU on a machine without CUDA.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            log.warning("d2f: no CUDA device for --device %s; decoding on the CPU", extra.pop("device"))
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- data parallel: lm-eval shards requests by rank and gathers results with these ------

    @property
    def device(self):
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # --- chat templates ------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ValueError(f"chat template {name!r} not among the tokenizer's: {sorted(template)}")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(f"--apply_chat_template: the tokenizer of {self.args['pretrained']} has no chat "
                             "template; run without it")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # --- requests ------------------------------------------------------------------------

    def loglikelihood(self, requests):
        raise ValueError(_NO_LOGLIKELIHOOD)

    def loglikelihood_rolling(self, requests):
        raise ValueError(_NO_LOGLIKELIHOOD)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        return [bos] + ids if self.add_bos_token and bos is not None else ids

    def _request_settings(self, gen_kwargs: dict) -> dict:
        """generate() keyword arguments for one request's gen_kwargs."""
        g = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.settings.max_new_tokens)
        s = dict(max_new_tokens=self.args.get("max_new_tokens", g["max_gen_toks"]),
                 stop_strings=[u for u in g["until"] if u])
        if g["do_sample"]:
            s.update(do_sample=True, temperature=float(g.get("temperature", 1.0)))
            s.update({k: g[k] for k in ("top_k", "top_p") if g.get(k) is not None})
        return s

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        t0 = time.perf_counter()
        groups: dict[str, list] = {}  # a batch shares its settings (length, stop strings, sampling)
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            settings = self._request_settings(gen_kwargs)
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append((i, self._encode(context), settings))
        d2f = {k: getattr(self.settings, k) for k in D2F_ARGS if k != "max_new_tokens"}
        if self.decoder == "vanilla":
            d2f = {"block_size": self.settings.block_size}
        elif self.decoder == "fast-dllm":  # one block at a time: its block_add_threshold is 1
            d2f.pop("block_add_threshold")
        special = set(self.tokenizer.all_special_ids)
        results: list[Optional[str]] = [None] * len(requests)
        tokens = forwards = 0
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="d2f generate_until")
        for members in groups.values():
            # Longest prompts first: the rows of a batch then differ little in length, so left
            # padding costs few positions.
            members.sort(key=lambda m: -len(m[1]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts, n_tok, n_fwd = self._generate([m[1] for m in batch], batch[0][2], d2f, special)
                for (i, _, _), text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                tokens += n_tok
                forwards += n_fwd
                bar.update(len(batch))
        bar.close()
        self._report_speed(dict(rank=self._rank, requests=len(requests), generated_tokens=tokens,
                                forwards=forwards, seconds=time.perf_counter() - t0))
        return results

    def _generate(self, prompts: list[list[int]], settings: dict, d2f: dict, special: set):
        """Texts cut at the first stop string, generated tokens (through the stop string, special
        tokens excluded), forwards: one left-padded batch through model.generate."""
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.model.config.eos_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        stops = settings["stop_strings"]
        kwargs = {k: v for k, v in settings.items() if k != "stop_strings"}
        with torch.no_grad():  # not inference_mode: the model's engine outlives the call
            out = self.model.generate(ids.to(self._device), attention_mask=mask.to(self._device),
                                      decoder=self.decoder, return_dict_in_generate=True,
                                      stop_strings=stops or None, tokenizer=self.tokenizer, **kwargs, **d2f)
        texts, tokens = [], 0
        for row, n in zip(out.sequences[:, width:].tolist(), out.new_tokens.tolist()):
            new = row[:n]
            tokens += sum(t not in special for t in new)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in stops:  # lm-eval's contract: the text before the first stop string
                text = text.split(stop)[0]
            texts.append(text)
        return texts, tokens, int(out.forwards.sum())

    def _report_speed(self, mine: dict) -> None:
        ranks = self.gather_object(mine, dst=0)
        if self._rank != 0:
            return
        stats = speed_summary(ranks, settings=dataclasses.asdict(self.settings), decoder=self.decoder,
                              batch_size=self.batch_size)
        SPEED_RUNS.append(stats)
        print(format_speed(stats), file=sys.stderr)


def speed_summary(ranks: list[dict], **context) -> dict:
    """Per rank and in total: generated tokens, wall time, tokens/s, forwards, tokens per
    forward. The total's wall time is the slowest rank's (the ranks run side by side)."""
    for r in ranks:
        r["tokens_per_s"] = r["generated_tokens"] / r["seconds"] if r["seconds"] else 0.0
        r["tokens_per_forward"] = r["generated_tokens"] / max(r["forwards"], 1)
    total = {k: sum(r[k] for r in ranks) for k in ("requests", "generated_tokens", "forwards")}
    total["seconds"] = max(r["seconds"] for r in ranks)
    total["tokens_per_s"] = total["generated_tokens"] / total["seconds"] if total["seconds"] else 0.0
    total["tokens_per_forward"] = total["generated_tokens"] / max(total["forwards"], 1)
    return dict(world_size=len(ranks), total=total, ranks=ranks, **context)


def format_speed(stats: dict) -> str:
    def line(name, s):
        return (f"[d2f-eval] {name}: requests={s['requests']} generated_tokens={s['generated_tokens']} "
                f"seconds={s['seconds']:.2f} tokens_per_s={s['tokens_per_s']:.1f} forwards={s['forwards']} "
                f"tokens_per_forward={s['tokens_per_forward']:.2f}")
    lines = [line(f"rank {r['rank']}", r) for r in stats["ranks"]] if stats["world_size"] > 1 else []
    return "\n".join(lines + [line(f"total ({stats['world_size']} process(es))", stats["total"])])


_NO_LOGLIKELIHOOD = ("the d2f model cannot score log-likelihoods (this task asks for them): D2F is a "
                     f"generation method; evaluate it on {GENERATION_TASKS}")


def _init_distributed(device: Optional[str]) -> tuple[int, int]:
    """(rank, world size): from torchrun's / accelerate launch's environment, with the process
    group started here when the launcher left that to the program."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        cuda = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _device_for_rank(device: Optional[str]) -> str:
    """The device this process decodes on: one GPU per local rank when running data parallel."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
