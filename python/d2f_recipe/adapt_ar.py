"""A diffusion teacher adapted from the autoregressive baseline, the way Dream-7B was made from
Qwen2.5-7B: a Dream-architecture model starts from the AR model's weights, predicts token p at
position p - 1 (Dream's shift, so the next-token head carries over), and is trained with the
masked-diffusion objective of ``train_teacher`` while its attention is annealed from causal to
bidirectional (DiffuLLaMA's schedule, arXiv 2410.17891).

The anneal runs over block-causal masks: for the first ``--anneal`` steps, tokens attend within
blocks whose size doubles from 1 (exactly the AR model's causal mask) to the whole sequence, so
every step is a mask the kernels and the model already understand; after it, attention is fully
bidirectional, as the teacher decodes.

Two changes to the plain objective (``train_teacher``'s defaults) keep the AR model's skill while
the bidirectional one is learnt; both measured on held-out problems:

- ``--ar-share``: that share of each batch stays clean under the causal mask and is scored as
  next-token prediction, the AR model's own loss. Without it AdamW rewrote this small model's
  weights (about 0.02 in size) within 200 steps at a learning rate of 1e-4 or more, and even at
  3e-5 the model under its causal mask fell from the AR model's 22 of 24 problems right to 16
  in 1200 steps; with half the batch at 1e-4 it still had 22 after 400 steps.
- ``--semi-ar-share``: that share of the others is noised as semi-autoregressive decoding finds
  the sequence (a clean prefix, one partly masked block, masked positions after it) instead of
  independently at one ratio, a state that independent masking almost never draws.

    python -m d2f_recipe.adapt_ar --ar runs/ar --out runs/teacher
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from safetensors.torch import load_file

from d2f_bench.tiny import dream_config
from d2f_ext.models import ModelConfig, model_for_config
from d2f_recipe import tokenizer_math, train_teacher
from d2f_recipe import training as tc


def dream_from_ar(ar_folder: str, mask_token_id: int):
    """The Dream model holding the AR checkpoint's weights (HF Llama and Dream share the Qwen2
    parameter names); Dream's q/k/v biases, which Llama lacks, start at zero, so the adapted model
    under a causal mask computes exactly the AR model's next-token logits."""
    from transformers import LlamaConfig

    ar = LlamaConfig.from_pretrained(ar_folder)
    # transformers 5 keeps rope_theta inside rope_parameters; older versions beside rope_scaling.
    rope = getattr(ar, "rope_parameters", None) or {"rope_theta": ar.rope_theta, **(ar.rope_scaling or {})}
    if ar.tie_word_embeddings or ar.attention_bias or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{ar_folder}: only an untied, bias-free Llama with plain RoPE maps onto Dream")
    config = dream_config(ar.vocab_size, mask_token_id, ar.eos_token_id, ar.hidden_size,
                           ar.num_attention_heads, ar.num_key_value_heads, ar.num_hidden_layers,
                           ar.intermediate_size, ar.max_position_embeddings, False)
    config.update(rope_theta=rope["rope_theta"], rms_norm_eps=ar.rms_norm_eps, pad_token_id=ar.pad_token_id)
    model = model_for_config(ModelConfig.from_dict(config))
    weights = load_file(os.path.join(ar_folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in missing):
        raise ValueError(f"{ar_folder}: weights do not map onto Dream (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for name in missing:
            model.get_parameter(name).zero_()
    return model


def anneal_block_ids(batch: tc.Batch, step: int, anneal: int) -> torch.Tensor:
    """int32 [B, L] for ``step``: blocks of 2^k positions, k rising linearly from 0 (causal) to
    cover the whole sequence at ``anneal``; then one block (bidirectional). Padding -1."""
    L = batch.ids.shape[1]
    if step >= anneal:
        ids = torch.zeros_like(batch.ids)
    else:
        size = 2 ** int(step / anneal * math.ceil(math.log2(max(L, 2))))
        ids = batch.positions().expand_as(batch.ids) // size
    return torch.where(batch.real(), ids, -1).to(torch.int32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ar", required=True, help="checkpoint folder of the AR baseline (train_ar)")
    p.add_argument("--out", required=True, help="checkpoint folder (also holds the resume state)")
    p.add_argument("--anneal", type=int, default=300, help="steps from causal to bidirectional attention")
    train_teacher.add_diffusion_args(p)
    tc.add_run_args(p, steps=6000, lr=2e-4, warmup=50, save_every=200)
    p.set_defaults(semi_ar_share=0.75, ar_share=0.5, batch=32)
    a = p.parse_args(argv)
    tc.check_counts(p, a, anneal=0, **tc.RUN_COUNTS, **train_teacher.DIFFUSION_COUNTS)
    tc.check_tokenizer_source(p, a, "ar")
    return a


def main(argv=None) -> list[float]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = tokenizer_math.load_or_build(a.out, a.ar)
    model = dream_from_ar(a.ar, tok.mask_token_id).to(a.device).train()
    return train_teacher.train_diffusion(a, model, tok, "adapt",
                                         lambda batch, step: anneal_block_ids(batch, step, a.anneal))


if __name__ == "__main__":
    main()
