"""The autoregressive baseline: transformers' LlamaForCausalLM of the teacher's width and depth,
trained from scratch on the same problems with the same tokenizer (next-token loss on the
response and its EOS only). Saved with save_pretrained, so HF generate runs it with a KV cache.

    python python/train_ar.py --out runs/ar --tokenizer runs/teacher --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import task_math  # noqa: E402
import tokenizer_math  # noqa: E402
import train_common as tc  # noqa: E402


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
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="the teacher's folder, to share its tokenizer (default: train one)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, help="MLP width (default 3 x hidden)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--train-size", type=int, default=100000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> list[float]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    tok = tokenizer_math.load_or_build(a.out, a.tokenizer, a.seed)
    model = build_model(tok, a.hidden, a.layers, a.heads, a.intermediate or 3 * a.hidden, a.max_len)
    model.to(a.device).train()
    problems = task_math.problems("train", a.train_size, a.seed)
    # No EOS canvas: generation stops at the first EOS, so one is all the model must learn.
    pairs = tc.encode_pairs(tok, [task_math.format_prompt(q.question) for q in problems],
                            [q.solution for q in problems], tok.eos_token_id, None)

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
