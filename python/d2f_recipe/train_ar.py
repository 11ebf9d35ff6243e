"""The autoregressive baseline: transformers' LlamaForCausalLM of the teacher's width and depth,
trained from scratch on the same problems with the same tokenizer (next-token loss on the
response and its EOS only). Saved with save_pretrained, so HF generate runs it with a KV cache.

    python -m d2f_recipe.train_ar --out runs/ar --tokenizer runs/teacher --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from d2f_recipe import training as tc


def build_model(tok, hidden: int, layers: int, heads: int, intermediate: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # rope_theta, bias-free layers and an untied head as in the teacher's LLaDA config, so that
    # the two differ in attention and objective only.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_len, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    tc.init_weights(model, layers)
    return model


def ar_loss(model, batch: tc.Batch) -> torch.Tensor:
    logits = model(input_ids=batch.ids, attention_mask=batch.real().long()).logits
    # Position p predicts token p + 1; only response tokens (and the EOS) are targets.
    target = batch.response()[:, 1:]
    return F.cross_entropy(logits[:, :-1][target].float(), batch.ids[:, 1:][target])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tc.add_pretraining_args(p, steps=3000)
    a = p.parse_args(argv)
    tc.check_pretraining_args(p, a)
    return a


def main(argv=None) -> list[float]:
    a = parse_args(argv)
    tok, model = tc.start_pretraining(a, build_model)
    # No EOS canvas: generation stops at the first EOS, so one is all the model must learn.
    pairs = tc.task_pairs(tok, a, None)

    def step_loss(step: int):
        batch = tc.collate([pairs[i] for i in tc.batch_indices(len(pairs), a.batch, a.seed, step)],
                           tok.pad_token_id)
        return ar_loss(model, batch.to(a.device)), int(batch.length.sum())

    def save():
        model.save_pretrained(a.out)
        model.generation_config.save_pretrained(a.out)

    return tc.run(tc.trainable(model), step_loss, steps=a.steps, lr=a.lr, warmup=a.warmup, out=a.out,
                  save=save, resume=a.resume, save_every=a.save_every, weight_decay=a.weight_decay,
                  desc="ar")


if __name__ == "__main__":
    main()
