"""Check the installed d2f_ext ops on this machine: ``python -m d2f_ext.selftest`` (or
``d2f-selftest``).

Runs attention, store_kv, unmask and pipeline_step on the device (cuda when available, else
cpu; ``--device``) against :mod:`d2f_ext.reference` (on CPU copies) at a few shapes and dtypes,
prints one verdict line per op with its largest error, and exits with 1 if any op fails. On CUDA
attention runs under each kernel setting of D2F_EXT_ATTENTION ("" and "mma"); on the CPU the
CPU-only ops (linear, rms_norm, rope) run too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from . import layout as L
from . import ops, reference
from .pipeline import BlockPipeline

# Largest attention error accepted against the float32 reference, by input dtype: a few units in
# the last place of each dtype for outputs of magnitude ~1.
ATTENTION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ATTENTION_KERNELS = ("", "mma")


def _dtypes(device: torch.device) -> list[torch.dtype]:
    """float16 kernels exist on CUDA only."""
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def _cpu(t):
    return None if t is None else t.cpu()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value for the block ("" removes it); the ops read it per call."""
    previous = os.environ.pop(name, None)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if previous is not None:
            os.environ[name] = previous


def _attention_case(g, device, dtype, B, W, H, Hkv, D, S, pad, permute):
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    Bc = B + 1 if permute else B
    q, k, v = rnd(B, W, H, D), rnd(B, W, Hkv, D), rnd(B, W, Hkv, D)
    k_cache, v_cache = rnd(Bc, S, Hkv, D), rnd(Bc, S, Hkv, D)
    lens = torch.tensor([S if b == 0 else (b * 7) % (S + 1) for b in range(B)], dtype=torch.int32)
    lens[-1] = 0  # an empty cache beside a full one
    block_ids = torch.tensor([[-1] * pad + [1 + (i - pad) // 4 for i in range(pad, W - pad)] + [-1] * pad
                              for _ in range(B)], dtype=torch.int32)
    rows = torch.randperm(Bc, generator=g)[:B].to(torch.int32) if permute else None
    return [t if t is None else t.to(device) for t in (q, k, v, k_cache, v_cache, lens, block_ids, rows)]


def check_attention(device: torch.device, kernel: str) -> float:
    """Largest error over the shapes; raises AssertionError past a dtype's tolerance."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in _dtypes(device):
        for D in (64, 128):
            for B, W, H, Hkv, S, pad, permute in ((2, 24, 8, 2, 40, 2, True), (3, 33, 4, 4, 17, 0, False)):
                args = _attention_case(g, device, dtype, B, W, H, Hkv, D, S, pad, permute)
                scale = D ** -0.5
                with _env("D2F_EXT_ATTENTION", kernel):
                    got = ops.attention(*args, scale=scale)
                want = reference.attention(*[a.float() if a is not None and a.is_floating_point() else a
                                             for a in map(_cpu, args)], scale=scale)
                err = (got.float().cpu() - want).abs().max().item()
                worst = max(worst, err)
                assert err <= ATTENTION_TOLERANCE[dtype], f"{dtype} D={D} B={B}: error {err:.3g}"
    return worst


def check_store_kv(device: torch.device) -> None:
    """The caches must equal the reference's exactly."""
    g = torch.Generator().manual_seed(1)
    for dtype in _dtypes(device):
        B, W, Hkv, D, S = 3, 9, 2, 64, 20
        _, k, v, k_cache, v_cache, _, _, rows = _attention_case(g, device, dtype, B, W, 2 * Hkv, Hkv, D, S, 0, True)
        lens = torch.tensor([0, 11, S - 4], dtype=torch.int32, device=device)
        start = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        length = torch.tensor([9, 7, 4], dtype=torch.int32, device=device)
        want_k, want_v = k_cache.cpu(), v_cache.cpu()
        reference.store_kv(want_k, want_v, k.cpu(), v.cpu(), lens.cpu(), start.cpu(), length.cpu(), rows.cpu())
        ops.store_kv(k_cache, v_cache, k, v, lens, start, length, rows)
        assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v), f"{dtype}: caches differ"


def check_unmask(device: torch.device) -> None:
    """Tokens, counts and eos_block must equal the reference's exactly."""
    g = torch.Generator().manual_seed(2)
    B, W, V = 2, 8, 151936
    mask_id = V - 1
    for dtype in _dtypes(device):
        logits = (torch.randn(B, W, V, generator=g) * 5).to(dtype)
        logits[0, 3, 1234] = float("inf")  # an inf logit: p = 1 for token 1234
        prev = (torch.randn(B, V, generator=g) * 5).to(dtype)
        tokens = torch.full((B, W), mask_id, dtype=torch.long)
        tokens[:, 0] = 7
        block_ids = torch.tensor([[0, 1, 1, 1, 2, 2, 2, -1]] * B, dtype=torch.int32)
        fully_activated = torch.tensor([[1, 1, 0]] * B, dtype=torch.int32)
        for temperature in (0.0, 0.8):
            for confidence, shift in (("default", False), ("margin_confidence", True), ("neg_entropy", False)):
                args = dict(prev_logits=prev.to(device) if shift else None, eos_id=5, skip_threshold=0.3,
                            temperature=temperature, sampling_strategy=confidence, seed=11)
                ours = tokens.to(device, copy=True)
                counts, eos = ops.unmask(logits.to(device), ours, block_ids.to(device), fully_activated.to(device),
                                         mask_id, **args)
                ref = tokens.clone()
                rc, re = reference.unmask(logits, ref, block_ids, fully_activated, prev if shift else None, mask_id, 5,
                                          0.3, temperature, L.CONFIDENCES[confidence], 11)
                case = f"{dtype} T={temperature} {confidence} shift={shift}"
                assert torch.equal(ours.cpu(), ref), f"{case}: tokens differ"
                assert torch.equal(counts.cpu(), rc) and torch.equal(eos.cpu(), re), f"{case}: counts differ"


def check_pipeline_step(device: torch.device) -> None:
    """The state must equal the reference's exactly after every step."""
    rng = random.Random(3)
    lens = torch.tensor([4, 1, 7], dtype=torch.int32)
    pipe = BlockPipeline(lens.to(device), 24, 4, 0.3, 0.9)
    rows, blocks = pipe.rows.cpu().clone(), pipe.blocks.cpu().clone()
    for _ in range(200):
        if bool(rows[:, L.FINISHED].all()):
            return
        counts = torch.zeros_like(blocks[:, 0])
        eos = torch.full((rows.shape[0],), -1, dtype=torch.int32)
        for b in range(rows.shape[0]):
            for i in range(int(rows[b, L.NUM_BLOCKS])):
                if blocks[b, L.STATE, i] == L.ACTIVE and blocks[b, L.MASKED, i] > 0:
                    counts[b, i] = rng.randint(int(blocks[b, L.FULLY_ACTIVATED, i]), int(blocks[b, L.MASKED, i]))
            if counts[b].any() and rng.random() < 0.05:
                eos[b] = int(counts[b].nonzero()[0, 0])
        pipe.step(counts.to(device), eos.to(device))
        reference.pipeline_step(rows, blocks, counts, eos, 4, 0.3, 0.9)
        assert torch.equal(pipe.rows.cpu(), rows) and torch.equal(pipe.blocks.cpu(), blocks), "state differs"
    raise AssertionError("the pipeline did not finish")


def check_linear() -> float:
    """CPU only (the op has no CUDA kernel): within float32 rounding of F.linear."""
    g = torch.Generator().manual_seed(4)
    err = 0.0
    for V, K, R in ((126464, 128, 3), (1001, 36, 16), (5, 300, 1)):
        w, x = torch.randn(V, K, generator=g), torch.randn(R, K, generator=g)
        want = reference.linear(x, w)
        d = (torch.ops.d2f_ext.linear(x, w) - want).abs().max().item()
        assert d <= 1e-4 * max(1.0, want.abs().max().item()), f"V={V} K={K} R={R}: error {d:.3g}"
        err = max(err, d)
    return err


def check_rms_norm() -> float:
    """CPU only, like linear: within float32 rounding of the reference."""
    g = torch.Generator().manual_seed(5)
    err = 0.0
    for R, D in ((16, 4096), (3, 13), (1, 1)):
        x, w = torch.randn(R, D, generator=g), torch.randn(D, generator=g)
        want = reference.rms_norm(x, w, 1e-5)
        d = (torch.ops.d2f_ext.rms_norm(x, w, 1e-5) - want).abs().max().item()
        assert d <= 1e-5 * max(1.0, want.abs().max().item()), f"R={R} D={D}: error {d:.3g}"
        err = max(err, d)
    return err


def check_rope() -> None:
    """CPU only: the reference's result bit for bit."""
    from .models.layers import rope_cos_sin

    g = torch.Generator().manual_seed(6)
    for B, L, H, D in ((1, 32, 32, 128), (2, 3, 2, 6)):
        cos, sin = rope_cos_sin(torch.randint(0, 4096, (B, L), generator=g), D, 500000.0)
        x = torch.randn(B, L, H, D, generator=g)
        assert torch.equal(torch.ops.d2f_ext.rope(x, cos, sin), reference.rope(x, cos, sin)), f"{B, L, H, D} differs"


def run(device: torch.device) -> bool:
    """Prints one verdict line per op; True when all pass."""
    checks: list[tuple[str, Callable[[], Optional[float]]]] = []
    for kernel in (ATTENTION_KERNELS if device.type == "cuda" else ("",)):
        name = f"attention[{kernel}]" if kernel else "attention"
        checks.append((name, lambda kernel=kernel: check_attention(device, kernel)))
    checks += [("store_kv", lambda: check_store_kv(device)), ("unmask", lambda: check_unmask(device)),
               ("pipeline_step", lambda: check_pipeline_step(device))]
    if device.type == "cpu":
        checks += [("linear", check_linear), ("rms_norm", check_rms_norm), ("rope", check_rope)]
    ok = True
    print(f"d2f_ext selftest on {device} ({ops.build_info()})")
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            err = check()
            verdict = f"PASS {name:<16} " + ("exact" if err is None else f"max error {err:.3g}")
        except Exception as e:  # noqa: BLE001  (a crash is a verdict too)
            ok = False
            verdict = f"FAIL {name:<16} {type(e).__name__}: {e}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"{verdict}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="d2f-selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to test (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    return 0 if run(device) else 1


if __name__ == "__main__":
    sys.exit(main())
