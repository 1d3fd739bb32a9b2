"""Triton: transformers' eager attention probabilities in one pass over the scores, bit for bit.

transformers' ``eager_attention_forward`` turns the BF16 scores ``S = Q @ K^T`` into probabilities with four
ATen kernels::

    p = softmax((S * scaling) + mask, dim=-1, dtype=float32).to(bfloat16)

each a full pass over a ``heads x q x k`` tensor: at Mistral-Large's 96 heads x 2048 x 2048 that is ~13 GB
of memory traffic per calibration sample (BF16 written and read back three times, an FP32 copy for the
softmax's input and another for its output), ~2.8 s of a calibration layer's 8.3 s on one H100
(docs/benchmarks.md, 2026-12-07).  This kernel reads the BF16 scores once and writes the BF16
probabilities in place: ~1.6 GB.

It is exact because it does what those kernels do, in their order:

* ``S * scaling``: ATen multiplies in fp32 by ``float(scaling)`` and rounds to BF16 (round to nearest even);
  ``+ mask``: fp32 sum of two BF16 values, rounded to BF16.  (Both are one IEEE operation each.)
* the FP32 softmax of rows of ``k <= 2048`` elements is ATen's persistent warp softmax
  (``softmax_warp_forward`` in ``ATen/native/cuda/PersistentSoftmax.cuh``, torch 2.11 - 2.13): one warp of
  ``W = min(next_pow2(k), 32)`` lanes per row; lane ``l`` holds elements ``l + W*it`` (``-inf`` past ``k``);
  the row max (exact in any order); each lane sums ``expf(x - max)`` sequentially in ``it`` order; the
  lanes' sums meet in an xor butterfly (offsets ``W/2 .. 1``: each step adds the upper half of the lanes to
  the lower half); then ``expf(x - max) / sum`` (IEEE division; NaN where the sum is 0).  ``expf`` is
  libdevice's ``__nv_expf``, the one nvcc links into ATen, here compiled without flush-to-zero as ATen is
  (``enable_reflect_ftz=False``) and without FMA contraction (``enable_fp_fusion=False``).
* ``.to(bfloat16)``: round to nearest even, NaN to 0x7FC0.

The roundings are done on the bits (integer adds), so the kernel gives the same bytes under Triton's CPU
interpreter, whose fp32 -> bf16 cast truncates (triton 3.6).  Nothing here depends on ATen choosing the
same kernel for the same shape across versions: :mod:`streaming_adapters.calibrate.attention` compares this
path with the model's own eager attention, bit for bit, the first time it meets each row length and falls
back to the stock path for good if they ever differ.
"""

from __future__ import annotations

import functools

import torch

from ._triton import jit, tl, triton

MAX_K = 2048  # ATen's persistent warp softmax takes rows up to 2048 elements (dispatch_softmax_forward)
ROWS = 4  # rows per program, one warp each: 4 warps


def _rne_bf16(x):
    """fp32 -> the fp32 value of its BF16 rounding (nearest even); NaN -> the quiet NaN 0x7FC0."""
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, r)
    return r.to(tl.float32, bitcast=True)


def _expf(x, LIBDEVICE: tl.constexpr):
    """ATen's ``std::exp(float)``: libdevice ``__nv_expf``.  Triton's CPU interpreter has no libdevice; there
    it is numpy's float32 exp (tests on CPU check the kernel's order and roundings, tests/gpu this exp)."""
    if LIBDEVICE:
        return tl.extra.cuda.libdevice.exp(x)
    return tl.exp(x)


def _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK: tl.constexpr, m_stride_k):
    """Columns ``cols`` of ROWS rows as the softmax sees them: fp32 of bf16(bf16(s * scale) + mask); ``-inf``
    past ``k`` (what softmax_warp_forward loads there)."""
    ok = valid_row[:, None] & (cols[None, :] < k)
    s = tl.load(s_ptr + row_off[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = _rne_bf16(s * scale)
    if HAS_MASK:
        m = tl.load(m_ptr + mrow_off[:, None] + cols[None, :] * m_stride_k, mask=ok, other=0.0).to(tl.float32)
        x = _rne_bf16(x + m)
    return tl.where(ok, x, float("-inf")), ok


def _eager_probs_kernel(
    s_ptr, m_ptr, n_rows, k, n_h, n_q, scale,
    m_stride_b, m_stride_h, m_stride_q, m_stride_k,
    W: tl.constexpr, IT: tl.constexpr, LOG_W: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid_row = rows < n_rows
    row_off = rows.to(tl.int64) * k
    q = rows % n_q
    h = (rows // n_q) % n_h
    b = rows // (n_q * n_h)
    mrow_off = b.to(tl.int64) * m_stride_b + h.to(tl.int64) * m_stride_h + q.to(tl.int64) * m_stride_q

    # the row max, exact in any order: the whole row in one load (many loads in flight; the later passes reread
    # it from cache)
    whole, whole_ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, tl.arange(0, IT * W), valid_row, scale, HAS_MASK,
                       m_stride_k)
    row_max = tl.reduce(whole, 1, tl.standard._elementwise_max)  # tl.reduce: the interpreter cannot call tl.max

    # each lane's sum, in its element order
    acc = tl.full((ROWS, W), 0.0, tl.float32)  # tl.full: tl.zeros is a jit function (interpreter)
    for it in range(IT):
        x, ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, it * W + tl.arange(0, W), valid_row, scale, HAS_MASK,
                        m_stride_k)
        acc = acc + _expf(x - row_max[:, None], LIBDEVICE)
    # the xor butterfly: lane l += lane l ^ off for off = W/2 .. 1; lane 0's tree, as halves added pairwise
    for step in tl.static_range(LOG_W):
        acc = tl.reduce(tl.reshape(acc, (ROWS, 2, W >> (step + 1))), 1, tl.standard._sum_combine)  # one add
    total = tl.reshape(acc, (ROWS,))

    for it in range(IT):
        cols = it * W + tl.arange(0, W)
        x, ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK, m_stride_k)
        e = _expf(x - row_max[:, None], LIBDEVICE)
        p = tl.math.div_rn(e, tl.broadcast_to(total[:, None], (ROWS, W)))
        p = tl.where(total[:, None] == 0.0, float("nan"), p)
        bits = (_rne_bf16(p).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(s_ptr + row_off[:, None] + cols[None, :], bits.to(tl.bfloat16, bitcast=True), mask=ok)


@functools.cache
def _kernel(interpret: bool):
    return jit(_eager_probs_kernel, interpret, ["n_rows", "k", "n_h", "n_q", "m_stride_b", "m_stride_h",
                                                "m_stride_q", "m_stride_k"], helpers=(_rne_bf16, _expf, _scores))


def applies(scores: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`eager_probs_` reproduces the stock path for these inputs: contiguous BF16
    ``[b, h, q, k]`` scores with ``k <= 2048``, and no mask or a BF16 one that broadcasts to them (a mask of
    another dtype would promote the sum, and the softmax's input, to that dtype)."""
    if scores.dtype != torch.bfloat16 or scores.dim() != 4 or not scores.is_contiguous():
        return False
    if not 0 < scores.shape[-1] <= MAX_K or scores.numel() == 0:
        return False
    if mask is None:
        return True
    if mask.dtype != torch.bfloat16 or mask.dim() != 4 or mask.device != scores.device:
        return False
    return all(m in (1, s) for m, s in zip(mask.shape, scores.shape))


def eager_probs_(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float, *, interpret: bool = False) -> None:
    """Replace BF16 ``scores`` ``[b, h, q, k]`` by ``softmax((scores * scaling) + mask, -1, float32).to(bf16)``
    in place, bit for bit as ATen computes it (module docstring).  The caller checks :func:`applies`."""
    b, h, q, k = scores.shape
    p = 1 << max(k - 1, 0).bit_length()  # next power of two >= k
    w = min(p, 32)
    n_rows = b * h * q
    if mask is None:
        m, strides = scores, (0, 0, 0, 0)
    else:
        m = mask
        strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    grid = (triton.cdiv(n_rows, ROWS),)
    _kernel(interpret)[grid](
        scores, m, n_rows, k, h, q, float(scaling), *strides,
        W=w, IT=p // w, LOG_W=w.bit_length() - 1, HAS_MASK=mask is not None, ROWS=ROWS, LIBDEVICE=not interpret,
        num_warps=ROWS, enable_fp_fusion=False, enable_reflect_ftz=False,
    )
