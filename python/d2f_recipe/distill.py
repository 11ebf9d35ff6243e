"""D2F asymmetric distillation of a pre-trained dLLM into a block-causal student.

Per example the response is cut into blocks of ``block_size``; each block gets a mask ratio,
non-decreasing from the first to the last (t_1 ~ U[0.2, 0.7], random increments keeping
t_N <= 0.7), and each response position is masked independently with its block's ratio; the
prompt never is. Teacher and student see the same noised sequence: the teacher (the model with the
LoRA adapter disabled, or a frozen copy under --full-finetune) with full bidirectional attention
and no grad, the student under the block-causal mask (prompt block 0, response blocks 1..N).
Loss: KL(teacher || student), i.e. the cross-entropy against the teacher's softmax less the
teacher's entropy, on the masked positions, each divided by its block's ratio, averaged over the
masked positions. Dream's right shift applies to both. ``--data-weight w`` adds w times the
cross-entropy against the training sequence's own tokens at the same positions, weighted the same
way, so the student can learn where its teacher is wrong (0, the default, is the paper's loss).

    python -m d2f_recipe.distill --teacher runs/teacher --out runs/student-lora --merge-to runs/student
    torchrun --nproc_per_node 8 -m d2f_recipe.distill --teacher GSAI-ML/LLaDA-8B-Instruct-folder ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist

from d2f_ext.models import load_adapter, load_model
from d2f_recipe import task_math
from d2f_recipe import training as tc

LORA_TARGETS = {"llada": ["q_proj", "k_proj", "v_proj", "attn_out"],
                "dream": ["q_proj", "k_proj", "v_proj", "o_proj"]}
RATIO_LOW, RATIO_HIGH = 0.2, 0.7


def block_ratios(batch: int, num_blocks: int, gen: torch.Generator,
                 low: float = RATIO_LOW, high: float = RATIO_HIGH) -> torch.Tensor:
    """[batch, num_blocks] non-decreasing mask ratios in [low, high]: t_1 ~ U[low, high], then a
    random share u ~ U(0, 1) of the room left above t_1 is spread over the blocks in random
    increments, so the last ratio is t_1 + u (high - t_1) <= high."""
    first = low + (high - low) * torch.rand(batch, 1, generator=gen)
    steps = torch.rand(batch, num_blocks - 1, generator=gen)
    share = torch.rand(batch, 1, generator=gen)
    rise = torch.cumsum(steps, 1) / steps.sum(1, keepdim=True).clamp(min=1e-12)
    rest = first + (high - first) * share * rise
    return torch.cat([first, rest], 1).clamp(max=high)


def student_block_ids(batch: tc.Batch, block_size: int) -> torch.Tensor:
    """int32 [B, L]: prompt 0, response block k (0-based) k + 1, padding -1."""
    pos = batch.positions()
    resp_block = torch.div(pos - batch.prompt_len[:, None], block_size, rounding_mode="floor") + 1
    ids = torch.where(pos < batch.prompt_len[:, None], 0, resp_block)
    return torch.where(batch.real(), ids, -1).to(torch.int32)


def teacher_block_ids(batch: tc.Batch) -> torch.Tensor:
    """int32 [B, L]: one block over every real token (full bidirectional attention; identical
    to no mask at all without padding), padding -1."""
    return torch.where(batch.real(), 0, -1).to(torch.int32)


def noise_batch(batch: tc.Batch, block_size: int, mask_id: int, gen: torch.Generator):
    """(noised ids, masked [B, L] bool, ratio [B, L] of each position's block (0 outside the
    response), student block ids)."""
    B, L = batch.ids.shape
    blocks = student_block_ids(batch, block_size)
    num_blocks = max(1, int(blocks.max()))
    ratios = block_ratios(B, num_blocks, gen).to(batch.ids.device)
    resp = batch.response()
    ratio = torch.where(resp, ratios.gather(1, (blocks.long() - 1).clamp(min=0)), 0.0)
    masked = resp & (torch.rand(B, L, generator=gen).to(resp.device) < ratio)
    return torch.where(masked, mask_id, batch.ids), masked, ratio, blocks


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, masked: torch.Tensor,
                 ratio: torch.Tensor, logit_shift: bool, targets: torch.Tensor | None = None,
                 data_weight: float = 0.0) -> torch.Tensor:
    """Mean over masked positions of (KL(teacher || student) + data_weight * CE(targets)) / block
    ratio, where CE is the student's cross-entropy against the clean tokens ``targets``.

    The KL's gradient is that of the cross-entropy against the teacher's softmax; the teacher's own
    entropy (a constant without gradient) is subtracted only so that the value reads as a
    divergence, 0 when the student matches the teacher, instead of drifting with the noise.
    """
    if logit_shift:
        student_logits, teacher_logits = tc.shift_logits(student_logits), tc.shift_logits(teacher_logits)
    log_t = torch.log_softmax(teacher_logits[masked].float(), -1)
    log_s = torch.log_softmax(student_logits[masked].float(), -1)
    loss = (log_t.exp() * (log_t - log_s)).sum(-1)
    if data_weight:
        loss = loss - data_weight * log_s.gather(-1, targets[masked][:, None]).squeeze(-1)
    # Sum over an empty selection keeps the graph, so a batch without masks still backpropagates.
    return (loss / ratio[masked]).sum() / masked.sum().clamp(min=1)


class Distiller:
    """The student and its teacher: the LoRA model with its adapter disabled, or a frozen copy
    when fully fine-tuning."""

    def __init__(self, base, full_finetune: bool, r: int = 32, alpha: int = 32, dropout: float = 0.1,
                 teacher_path: str | None = None, data_weight: float = 0.0):
        self.config = base.config
        self.data_weight = data_weight
        if full_finetune:
            self.teacher = copy.deepcopy(base).eval().requires_grad_(False)
            self.peft = None
            self.student = base.train().requires_grad_(True)
        else:
            import peft

            lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                   target_modules=LORA_TARGETS[base.config.arch])
            self.peft = peft.get_peft_model(base, lora).train()
            # PEFT takes the base path from the model, which a d2f_ext model does not carry.
            self.peft.peft_config["default"].base_model_name_or_path = teacher_path
            self.student = self.peft
            self.teacher = None
        self.forward_student = self.student  # replaced by the DDP wrapper when distributed

    @torch.no_grad()
    def teacher_logits(self, noised: torch.Tensor, batch: tc.Batch) -> torch.Tensor:
        full = teacher_block_ids(batch)
        if self.peft is None:
            return self.teacher(noised, block_ids=full)
        with self.peft.disable_adapter():
            return self.peft(noised, block_ids=full)

    def student_logits(self, noised: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return self.forward_student(noised, block_ids=blocks)

    def loss(self, batch: tc.Batch, block_size: int, gen: torch.Generator) -> torch.Tensor:
        noised, masked, ratio, blocks = noise_batch(batch, block_size, self.config.mask_token_id, gen)
        teacher = self.teacher_logits(noised, batch)
        student = self.student_logits(noised, blocks)
        return distill_loss(student, teacher, masked, ratio, self.config.logit_shift,
                            batch.ids, self.data_weight)

    def save(self, out: str, tokenizer_src: str) -> None:
        if self.peft is not None:
            # Embeddings are not adapted; "auto" would try to reload the base config through HF.
            self.peft.save_pretrained(out, save_embedding_layers=False)
        else:
            tc.save_checkpoint(self.student, out, tokenizer_src)


def merge(teacher: str, adapter: str, folder: str) -> None:
    """A plain checkpoint folder: the teacher with the adapter merged in, and its tokenizer."""
    tc.save_checkpoint(load_adapter(load_model(teacher), adapter), folder, teacher)


def load_pairs(a, tok, eos: int):
    """(prompt, response) ids: the math task's training problems, or a JSONL file of
    {"prompt", "response"} records for real checkpoints."""
    if a.data:
        with open(a.data, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    else:
        prompts, responses = tc.task_examples(a)
    if a.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return tc.encode_pairs(tok, prompts, responses, eos, a.gen_len)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="checkpoint folder of the pre-trained dLLM")
    p.add_argument("--out", required=True, help="adapter folder (PEFT format), or the checkpoint "
                   "folder with --full-finetune; also holds the resume state")
    p.add_argument("--merge-to", help="also write the teacher with the adapter merged, as a checkpoint")
    p.add_argument("--full-finetune", action="store_true", help="train every weight (small models)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--data-weight", type=float, default=0.0, help="weight of the cross-entropy "
                   "against the data's own tokens, added to the KL (0: distillation only)")
    p.add_argument("--data", help="JSONL of {prompt, response} (default: the math task)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--eos-id", type=int, help="EOS id when the tokenizer has none")
    p.add_argument("--gen-len", type=int, default=64, help="response canvas, filled with EOS")
    p.add_argument("--train-size", type=int, default=100000)
    task_math.add_level_arg(p)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    a = p.parse_args(argv)
    tc.check_counts(p, a, **tc.RUN_COUNTS, lora_r=1, block_size=1, gen_len=1, eos_id=0)
    if not a.data_weight >= 0:  # also refuses nan
        p.error(f"--data-weight must be >= 0, got {a.data_weight}")
    if a.merge_to and a.full_finetune:
        p.error("--merge-to needs a LoRA run: with --full-finetune --out is the checkpoint")
    if a.full_finetune or a.merge_to:  # the checkpoint written takes the teacher's tokenizer
        tc.check_tokenizer_source(p, a, "teacher")
    return a


def main(argv=None) -> list[float]:
    a = parse_args(argv)
    from transformers import AutoTokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.device(device).type == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    eos = tok.eos_token_id if tok.eos_token_id is not None else a.eos_id
    if eos is None:
        raise ValueError(f"--eos-id: {a.teacher}'s tokenizer has no EOS token, give its id")
    pairs = load_pairs(a, tok, eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    base = load_model(a.teacher, dtype=getattr(torch, a.dtype), device=device)
    d = Distiller(base, a.full_finetune, a.lora_r, a.lora_alpha, a.lora_dropout, a.teacher,
                  a.data_weight)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        d.forward_student = DDP(d.student, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    def step_loss(step: int):
        draw = step * world + rank  # each process its own batches
        batch = tc.collate([pairs[i] for i in tc.batch_indices(len(pairs), a.batch, a.seed, draw)], pad)
        return d.loss(batch.to(device), a.block_size, tc.step_generator(a.seed, draw)), int(batch.length.sum())

    def save():
        d.save(a.out, a.teacher)
        if a.merge_to:
            merge(a.teacher, a.out, a.merge_to)
        # The student decodes blocks of the size it was distilled on, over the trained canvas.
        checkpoint = a.out if d.peft is None else a.merge_to  # an adapter folder takes none
        if checkpoint:
            tc.write_generation_config(checkpoint, block_size=a.block_size, max_new_tokens=a.gen_len)

    losses = tc.run(tc.trainable(d.student), step_loss, steps=a.steps, lr=a.lr, warmup=a.warmup,
                    out=a.out, save=save, resume=a.resume, save_every=a.save_every, desc="distill",
                    is_main=rank == 0)
    if distributed:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
