"""Eager attention on CUDA with its probabilities made in one pass: same bits, a fraction of the traffic.

llm-compressor calibrates with transformers' eager attention, so the compressed-tensors W4A4 output must be
calibrated with it to match that producer bit for bit.  Eager's softmax of the ``heads x S x S`` scores
(four ATen passes, ~13 GB of memory traffic per 2048-token sample at 96 heads) was 2.8 s of a
Mistral-Large calibration layer's 8.3 s on one H100 (docs/benchmarks.md, 2026-12-07).
:func:`fused_eager_attention` is the model's own ``eager_attention_forward`` with those four passes
replaced by :func:`streaming_adapters.numerics.triton_softmax.eager_probs_` (one pass, in place).

Trust, but check: the kernel replays ATen's arithmetic in ATen's order (that module's docstring), which ATen
could change in a release.  The first time a process meets a row length (by power of two, the unit in
which ATen picks its softmax kernel), this function also runs the stock attention and compares both
outputs bit for bit; one differing bit turns the fast path off for the rest of the process (a warning,
and :func:`status` says why) and that call returns the stock result.  ``SA_FUSED_EAGER=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

NAME = "sa_eager"  # the name transformers' AttentionInterface knows this function by
log = logging.getLogger("streaming_adapters.calibrate")


class _State:
    verified: set[int] = set()  # row-length buckets (next power of two) checked bit for bit against stock
    disabled: str | None = None  # why the fast path is off
    calls = 0  # fast calls (not counting the checks)


def status(attn_implementation: str = "eager") -> str:
    """One phrase for logs and report.json: which kernel made the eager probabilities in this process (an
    attention other than eager makes none: its name)."""
    if attn_implementation != "eager":
        return f"{attn_implementation} (not eager: no separate probabilities)"
    if _State.disabled:
        return f"stock eager ({_State.disabled})"
    if not _State.verified:  # every fast call follows a check that verified its bucket
        return "stock eager (fused path not used)"
    return f"fused (equal to stock eager bit for bit at row lengths <= {sorted(_State.verified)})"


def _family(module):
    """The transformers modeling module of this attention module: its ``eager_attention_forward`` (what the
    stock eager path calls) and its ``repeat_kv``."""
    return sys.modules[type(module).__module__]


def fused_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """``eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout)`` of the
    module's family, bit for bit; the probabilities by the Triton kernel whenever it applies."""
    from ..numerics import triton_softmax

    family = _family(module)
    stock = family.eager_attention_forward
    if _State.disabled or module.training or not query.is_cuda:
        return stock(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    key_states = family.repeat_kv(key, module.num_key_value_groups)
    value_states = family.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key_states.transpose(2, 3))
    if not triton_softmax.applies(scores, attention_mask):
        del scores
        return stock(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    bucket = triton_softmax.row_bucket(scores.shape[-1])
    check = bucket not in _State.verified
    if check:
        ref_out, ref_probs = stock(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   **kwargs)
    try:
        triton_softmax.eager_probs_(scores, attention_mask, scaling)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot build or launch here must not stop the run
        _State.disabled = f"the fused kernel failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log.warning("eager attention: %s; using the stock eager attention from here on", _State.disabled)
        if check:
            return ref_out, ref_probs
        return stock(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = torch.matmul(scores, value_states).transpose(1, 2).contiguous()
    if check:
        same = _same_bits(out, ref_out) and _same_bits(scores, ref_probs)
        if not same:
            _State.disabled = (f"the fused probabilities differed from torch {torch.__version__}'s at row length "
                               f"{scores.shape[-1]}")
            log.warning("eager attention: %s; using the stock eager attention from here on", _State.disabled)
            return ref_out, ref_probs
        _State.verified.add(bucket)
        log.info("eager attention: fused probabilities equal stock eager's bit for bit at row length %d",
                 scores.shape[-1])
    _State.calls += 1
    return out, scores


def _same_bits(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.view(torch.int16) if a.element_size() == 2 else a, b.view(torch.int16) if b.element_size() == 2 else b)


def implementation(attn_implementation: str, device: torch.device) -> str:
    """What to build the model with: :data:`NAME` for eager on a CUDA device with Triton (registered with
    transformers here), else ``attn_implementation`` unchanged."""
    from ..numerics._triton import triton_available

    if attn_implementation != "eager" or device.type != "cuda" or not triton_available():
        return attn_implementation
    if os.environ.get("SA_FUSED_EAGER", "1") == "0":
        return attn_implementation
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, fused_eager_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # the same additive BF16 mask as stock eager
    return NAME
