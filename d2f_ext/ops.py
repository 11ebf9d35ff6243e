"""The d2f_ext ops: thin wrappers over ``torch.ops.d2f_ext`` with shapes documented.

When the compiled extension ``d2f_ext._C`` cannot be loaded, every wrapper falls back to the
plain-PyTorch twin in :mod:`d2f_ext.reference` (same results, slower); :data:`HAVE_C` tells which.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

from . import layout as L
from . import reference

try:
    from . import _C  # noqa: F401  (registers torch.ops.d2f_ext)
    HAVE_C = True
except ImportError as _err:  # pragma: no cover - exercised only on broken installs
    HAVE_C = False
    _IMPORT_ERROR = (f"no compiled extension in {os.path.dirname(__file__)}"
                     if importlib.util.find_spec(f"{__package__}._C") is None else str(_err))


def build_info() -> dict:
    """What the loaded extension was built with: torch version, CUDA compiled in, archs."""
    if not HAVE_C:
        return {"extension": False, "error": str(_IMPORT_ERROR), "torch": torch.__version__}
    fields = dict(kv.split("=", 1) for kv in torch.ops.d2f_ext.build_info().split(";"))
    return {"extension": True, "torch": fields["torch"], "cuda": fields["cuda"] == "1",
            "cuda_archs": [a for a in fields["cuda_archs"].split(",") if a],
            "openmp": fields["openmp"] == "1", "torch_runtime": torch.__version__}


ATTENTION_KERNELS = (None, "simt", "mma")

_debug_checks = os.environ.get("D2F_EXT_DEBUG_CHECKS") == "1"  # the flag when _C is not loaded


def set_debug_checks(on: bool) -> bool:
    """Turn the ops' value checks on or off; returns the previous setting.

    Shapes, dtypes and devices are always checked. Index values (cache_lens, cache_rows,
    src_start/src_len, block_ids in range and in order) are checked only in debug mode, because
    reading them on the host synchronises with the GPU once per tensor (about 200 times per
    forward of an 8B model). Outside debug mode out-of-range values never read or write out of
    bounds: each op's docstring states how it clamps or skips them, and d2f_ext.reference does
    the same. Debug mode starts on when the environment has D2F_EXT_DEBUG_CHECKS=1; CUDA-graph
    capture skips the checks either way (the eager run before it has made them).
    """
    global _debug_checks
    if not HAVE_C:
        previous, _debug_checks = _debug_checks, bool(on)
        return previous
    return torch.ops.d2f_ext.set_debug_checks(bool(on))


def debug_checks() -> bool:
    """Whether the ops check index values (see :func:`set_debug_checks`)."""
    return torch.ops.d2f_ext.debug_checks() if HAVE_C else _debug_checks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, cache_lens: torch.Tensor, block_ids: torch.Tensor,
              cache_rows: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              kernel: Optional[str] = None) -> torch.Tensor:
    """Block-causal attention of a window over a KV cache plus the window itself.

    q: [B, W, H, D]; k, v: [B, W, Hkv, D] (H % Hkv == 0; last dim contiguous, any other strides).
    k_cache, v_cache: [Bc, S, Hkv, D] contiguous. cache_lens: int32 [B], cached positions per row.
    block_ids: int32 [B, W]: window token i sees token j iff 0 <= block_ids[j] <= block_ids[i];
    -1 marks padding (never seen; its output is 0). Non-decreasing over a row's real tokens.
    cache_rows: optional int32 [B], the cache row each query row reads (default: row b).
    Returns [B, W, H, D] in q's dtype (float32, bfloat16; float16 on CUDA).
    kernel: the CUDA kernel, "simt" (the default) or "mma" (tensor cores: bfloat16/float16 at
    head_dim 64 or 128 on sm_80+, 16-byte aligned operands; other calls run "simt"). None takes
    the D2F_EXT_ATTENTION environment variable, read once, on the first such call. CPU tensors
    always run the CPU kernel.
    Values out of range, checked only in debug mode (:func:`set_debug_checks`): a row whose
    cache_rows value is outside [0, Bc) reads no cache, cache_lens clamps to [0, S], block ids
    below -1 are padding; ids that decrease give unspecified (in-bounds) output.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not HAVE_C:
        return reference.attention(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows, scale)
    return torch.ops.d2f_ext.attention(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows, scale,
                                       kernel)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             cache_lens: torch.Tensor, src_start: torch.Tensor, src_len: torch.Tensor,
             cache_rows: Optional[torch.Tensor] = None) -> None:
    """Write window rows [src_start[b], src_start[b] + src_len[b]) of k, v ([B, W, Hkv, D]) into
    the caches ([Bc, S, Hkv, D]) of row b (or cache_rows[b]) from position cache_lens[b] on.
    cache_lens, src_start, src_len: int32 [B]. In debug mode (:func:`set_debug_checks`) raises
    if a value is out of range or a row would overflow S; otherwise each copy whose window row,
    cache position or cache row is out of range is skipped (the others are made)."""
    if not HAVE_C:
        return reference.store_kv(k_cache, v_cache, k, v, cache_lens, src_start, src_len, cache_rows)
    torch.ops.d2f_ext.store_kv(k_cache, v_cache, k, v, cache_lens, src_start, src_len, cache_rows)


def _filter_top_k_top_p(x: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    # The spec's order: top-p first, then top-k, on temperature-scaled logits. NaN is -inf here
    # as in the kernels: left in, it would make softmax all NaN and rank first in topk, and so
    # switch the filter off for its row.
    x = x.masked_fill(x.isnan(), float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x.float(), dim=-1).cumsum(-1)
        drop_sorted = cum > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if top_k is not None and top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return x


def unmask(logits: torch.Tensor, tokens: torch.Tensor, block_ids: torch.Tensor,
           fully_activated: torch.Tensor, mask_id: int, *, prev_logits: Optional[torch.Tensor] = None,
           eos_id: int = -1, skip_threshold: float = 0.9, temperature: float = 0.0,
           sampling_strategy: str = "default", seed: int = 0, top_k: Optional[int] = None,
           top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-threshold unmasking of one forward's logits, tokens written in place.

    logits: [B, W, V] (float32, bfloat16, float16); tokens: int64 [B, W] contiguous;
    block_ids: int32 [B, W], the global block of each position (-1: never decoded; ids outside
    [-1, NB) are rejected in debug mode, else skipped like -1);
    fully_activated: int32 [B, NB] (block i forced to progress when fully_activated[:, i]).
    prev_logits: [B, V] for models whose logits are shifted right by one (Dream): position w
    then reads logits row w - 1 and position 0 reads prev_logits.
    A masked position is decoded when its probability p > skip_threshold; a fully activated block
    that decodes nothing decodes its most confident position (sampling_strategy: "default" = p,
    "margin_confidence" = top1 - top2, "neg_entropy"). temperature > 0 samples with Gumbel noise
    drawn from (seed, row, position, token); top_k / top_p filter first (a slower path).
    Non-finite logits: NaN counts as -inf; +inf logits share probability 1 evenly (all others
    get 0); a row of -inf only is uniform; the token is the argmax (with noise when sampling)
    over every id but mask_id, lowest index on ties, so among several +inf logits the lowest
    index. Confidences are therefore never NaN, and a block forces exactly one position.
    Returns (counts int32 [B, NB]: newly decoded per block, eos_block int32 [B]: lowest block in
    which eos_id was decoded, -1 if none).
    """
    if sampling_strategy not in L.CONFIDENCES:
        raise ValueError(f"sampling_strategy must be one of {sorted(L.CONFIDENCES)}, got {sampling_strategy!r}")
    # Checked before the filter branch: a top_p above 1, NaN or a negative top_k would skip it.
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")
    if (top_k is not None and top_k > 0) or top_p < 1.0:
        scale = temperature if temperature > 0 else 1.0
        logits = _filter_top_k_top_p(logits.float() / scale, top_k, top_p)
        if prev_logits is not None:
            prev_logits = _filter_top_k_top_p(prev_logits.float() / scale, top_k, top_p)
        temperature = 1.0 if temperature > 0 else 0.0
    args = (logits, tokens, block_ids, fully_activated, prev_logits, int(mask_id), int(eos_id),
            float(skip_threshold), float(temperature), L.CONFIDENCES[sampling_strategy],
            int(seed) & ((1 << 63) - 1))
    if not HAVE_C:
        return reference.unmask(*args)
    return torch.ops.d2f_ext.unmask(*args)


def pipeline_step(rows: torch.Tensor, blocks: torch.Tensor, counts: torch.Tensor,
                  eos_block: torch.Tensor, block_size: int, block_add_threshold: float,
                  decoded_token_threshold: float) -> None:
    """Advance the D2F block-state machine of every row by one step, in place.

    rows: int32 [B, layout.NUM_ROW_FIELDS]; blocks: int32 [B, layout.NUM_BLOCK_FIELDS, NB];
    counts: int32 [B, NB] and eos_block: int32 [B] from the last :func:`unmask` (zeros and -1
    before the first forward). Applies them, finishes blocks, then plans the next forward
    (appends a block, activates, detects the end, sets the window and the commit span).
    """
    args = (rows, blocks, counts, eos_block, int(block_size), float(block_add_threshold), float(decoded_token_threshold))
    if not HAVE_C:
        return reference.pipeline_step(*args)
    torch.ops.d2f_ext.pipeline_step(*args)


# A linear layer runs as the d2f_ext kernel up to 48 rows and as torch's BLAS (F.linear) above,
# where BLAS's blocking reuses each weight tile across enough rows to catch up (2-core x86-64 with
# AVX-512, the shipped model's layers and the conformance models' heads, at 1 and 2 threads: the
# kernel still leads at 48 rows; python -m d2f_bench.linear, results/linear).
LINEAR_KERNEL_MAX_ROWS = 48


def _cpu_kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether a CPU-only op (:func:`linear`, :func:`rms_norm`, :func:`rope`) may run its kernel
    on these tensors: all float32 on the CPU, no gradient wanted (the kernels have no backward)."""
    return HAVE_C and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A linear layer, ``input @ weight.T + bias``: input [..., K], weight [N, K], bias [N] or
    None -> [..., N].

    float32 on the CPU at up to ``LINEAR_KERNEL_MAX_ROWS`` rows (a decoding step's window or
    the positions it reads), with no gradient wanted, runs the d2f_ext kernel (the bias added to
    each finished sum): one pass over the weight, every output one thread's sum in a fixed order (so
    independent of the thread count), within float32 rounding of BLAS. Everything else is
    ``F.linear``.
    """
    rows = math.prod(input.shape[:-1])
    if (not _cpu_kernel_applies(input, weight, *([] if bias is None else [bias])) or weight.dim() != 2
            or rows > LINEAR_KERNEL_MAX_ROWS):
        return reference.linear(input, weight, bias)
    flat = input.reshape(rows, input.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    # A bias of the output features is added in the kernel; any other (a bias over the leading
    # dimensions too) after it, on the output's own shape, so that it broadcasts as F.linear's does.
    fused = bias is not None and bias.shape == weight.shape[:1] and bias.is_contiguous()
    out = torch.ops.d2f_ext.linear(flat, weight.contiguous(), bias if fused else None)
    out = out.reshape(*input.shape[:-1], weight.shape[0])
    if bias is not None and not fused:
        out += bias
    return out


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * input / sqrt(mean(input^2) + eps)``; input
    [..., D], weight [D]. The d2f_ext kernel for float32 CPU tensors without a gradient wanted
    (within float32 rounding of the reference: the sum of squares is added up in another order),
    the reference otherwise."""
    if not _cpu_kernel_applies(input, weight):
        return reference.rms_norm(input, weight, eps)
    return torch.ops.d2f_ext.rms_norm(input, weight, float(eps))


def rope(input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of input [B, L, H, D] (last dim contiguous) by cos, sin float32
    [B, L, 1, D] contiguous (``d2f_ext.models.layers.rope_cos_sin``). The d2f_ext kernel for
    float32 CPU tensors without a gradient wanted, bit for bit the reference's result; the
    reference otherwise."""
    if not _cpu_kernel_applies(input, cos, sin) or input.dim() != 4 or input.stride(-1) != 1:
        return reference.rope(input, cos, sin)
    return torch.ops.d2f_ext.rope(input, cos.contiguous(), sin.contiguous())


if HAVE_C:
    @torch.library.register_fake("d2f_ext::rms_norm")
    def _rms_norm_fake(input, weight, eps):
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @torch.library.register_fake("d2f_ext::rope")
    def _rope_fake(input, cos, sin):
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @torch.library.register_fake("d2f_ext::attention")
    def _attention_fake(q, k, v, k_cache, v_cache, cache_lens, block_ids, cache_rows, scale, kernel=None):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("d2f_ext::store_kv")
    def _store_kv_fake(k_cache, v_cache, k, v, cache_lens, src_start, src_len, cache_rows):
        return None

    @torch.library.register_fake("d2f_ext::unmask")
    def _unmask_fake(logits, tokens, block_ids, fully_activated, prev_logits, mask_id, eos_id,
                     skip_threshold, temperature, confidence, seed):
        B, NB = fully_activated.shape
        return (logits.new_empty((B, NB), dtype=torch.int32),
                logits.new_empty((B,), dtype=torch.int32))

    @torch.library.register_fake("d2f_ext::linear")
    def _linear_fake(input, weight, bias=None):
        return input.new_empty((input.shape[0], weight.shape[0]))

    @torch.library.register_fake("d2f_ext::pipeline_step")
    def _pipeline_step_fake(rows, blocks, counts, eos_block, block_size, block_add_threshold, decoded_token_threshold):
        return None
