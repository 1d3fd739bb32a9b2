"""Triton: transformers' eager attention probabilities in one pass over the scores, bit for bit.

transformers' ``eager_attention_forward`` turns the BF16 scores ``S = Q @ K^T`` into probabilities with four
ATen kernels::

    p = softmax((S * scaling) + mask, dim=-1, dtype=float32).to(bfloat16)

each a full pass over a ``heads x q x k`` tensor: at Mistral-Large's 96 heads x 2048 x 2048 that is ~13 GB
of memory traffic per calibration sample (BF16 written and read back three times, an FP32 copy for the
softmax's input and another for its output), ~2.8 s of a calibration layer's 8.3 s on one H100
(docs/benchmarks.md, 2026-12-07).  This kernel works a program's rows (2 by default, 8 KB) in three
passes that stay in cache after the first: the row max (one vectorised load of the whole row, which also
writes the softmax's BF16 inputs over the scores), each lane's sum of exps, and the probabilities written
in place.  Main memory sees ~1.6 GB a sample plus the staged write-back; one H100 takes 1.61 ms a sample
where ATen's four passes take 4.71 ms (:class:`Tuning`).

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

import dataclasses
import functools
import os

import torch

from ._triton import jit, tl, triton

MAX_K = 2048  # ATen's persistent warp softmax takes rows up to 2048 elements (dispatch_softmax_forward)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the kernel is launched.  Every choice gives the same bytes (the adds and roundings do not depend on
    it); only the speed does (tests/gpu/bench_softmax.py times them side by side)."""

    # The defaults are the fastest of the choices tried on one H100 at 96 x 2048 x 2048 with a causal mask
    # (2026-12-07, tests/gpu/bench_softmax.py): 1.60-1.61 ms a sample against stock's 4.71 ms; 4 rows 1.72 ms;
    # unrolled but not staged 2.47 ms, neither 2.77 ms; a max taken lane by lane (whole=False) 5.4-14 ms.
    rows: int = 2  # rows per program
    warps: int = 2
    unroll: int = 8  # passes 2-3 unrolled by this factor: that many iterations' loads issue together
    staged: bool = True  # pass 1 writes bf16(bf16(s * scale) + mask) over the scores; passes 2-3 read it back
    whole: bool = True  # pass 1 (the max) loads the whole row at once; else lane by lane, as passes 2-3

    def __post_init__(self):
        for name in ("rows", "warps", "unroll"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 < v <= 64 and v & (v - 1) == 0):
                raise ValueError(f"Tuning.{name} must be a power of two from 1 to 64, got {v!r}")

    @classmethod
    def parse(cls, text: str) -> "Tuning":
        """``"rows=4,warps=4,unroll=8,staged=0,whole=1"`` (any subset): the ``SA_EAGER_TUNING`` override
        benchmarks use."""
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            name, _, value = item.partition("=")
            if name not in names or not value.isdigit():
                raise ValueError(f"SA_EAGER_TUNING: expected name=integer with name in {', '.join(names)}; "
                                 f"got {item!r}")
            kw[name] = type(getattr(cls, name))(int(value))  # bool fields: 0 / 1
        return cls(**kw)


@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> Tuning:
    return Tuning.parse(text)


def default_tuning() -> Tuning:
    """The defaults, or ``SA_EAGER_TUNING``'s (parsed once per value: this runs for every attention call)."""
    return _parsed(os.environ.get("SA_EAGER_TUNING", ""))


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


def _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK: tl.constexpr, m_stride_k,
            STAGED: tl.constexpr):
    """Columns ``cols`` of ROWS rows as the softmax sees them, and where they are in the row: fp32 of
    bf16(bf16(s * scale) + mask), or, ``STAGED``, the BF16 values pass 1 wrote over the scores (the same
    values: they are BF16); ``-inf`` past ``k`` (what softmax_warp_forward loads there)."""
    ok = valid_row[:, None] & (cols[None, :] < k)
    x = tl.load(s_ptr + row_off[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if not STAGED:
        x = _rne_bf16(x * scale)
        if HAS_MASK:
            m = tl.load(m_ptr + mrow_off[:, None] + cols[None, :] * m_stride_k, mask=ok, other=0.0).to(tl.float32)
            x = _rne_bf16(x + m)
    return tl.where(ok, x, float("-inf")), ok


def _lane_sum(acc, it, s_ptr, m_ptr, row_off, mrow_off, k, valid_row, scale, row_max, HAS_MASK: tl.constexpr,
              m_stride_k, W: tl.constexpr, STAGED: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Each lane's sum after element ``it``: ``acc + expf(x - max)``."""
    x, ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, it * W + tl.arange(0, W), valid_row, scale, HAS_MASK,
                    m_stride_k, STAGED)
    return acc + _expf(x - row_max[:, None], LIBDEVICE)


def _write_probs(it, s_ptr, m_ptr, row_off, mrow_off, k, valid_row, scale, row_max, total, HAS_MASK: tl.constexpr,
                 m_stride_k, W: tl.constexpr, STAGED: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Elements ``it * W + lane``: ``bf16(expf(x - max) / sum)``, stored over the scores."""
    cols = it * W + tl.arange(0, W)
    x, ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK, m_stride_k, STAGED)
    e = _expf(x - row_max[:, None], LIBDEVICE)
    p = tl.math.div_rn(e, tl.broadcast_to(total[:, None], (total.shape[0], W)))
    p = tl.where(total[:, None] == 0.0, float("nan"), p)
    tl.store(s_ptr + row_off[:, None] + cols[None, :], _bf16_bits(p), mask=ok)


def _bf16_bits(x):
    """fp32 -> its BF16 rounding (nearest even) as a bfloat16 tensor."""
    return (_rne_bf16(x).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _eager_probs_kernel(
    s_ptr, m_ptr, n_rows, k, n_h, n_q, scale,
    m_stride_b, m_stride_h, m_stride_q, m_stride_k,
    W: tl.constexpr, IT: tl.constexpr, LOG_W: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr,
    LIBDEVICE: tl.constexpr, UNROLL: tl.constexpr, STAGED: tl.constexpr, WHOLE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid_row = rows < n_rows
    row_off = rows.to(tl.int64) * k
    q = rows % n_q
    h = (rows // n_q) % n_h
    b = rows // (n_q * n_h)
    mrow_off = b.to(tl.int64) * m_stride_b + h.to(tl.int64) * m_stride_h + q.to(tl.int64) * m_stride_q

    # the row max, exact in any order.  WHOLE: the whole row in one load (vectorised, every load in flight at
    # once, 64 registers a thread at k = 2048); else lane by lane like the passes below (fewer registers, more
    # programs resident).  STAGED: the softmax's inputs written over the scores (exact: they are BF16 values).
    if WHOLE:
        cols = tl.arange(0, IT * W)
        whole, whole_ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK, m_stride_k,
                                  False)
        row_max = tl.reduce(whole, 1, tl.standard._elementwise_max)  # the interpreter cannot call tl.max
        if STAGED:
            tl.store(s_ptr + row_off[:, None] + cols[None, :], whole.to(tl.bfloat16), mask=whole_ok)
    else:
        lane_max = tl.full((ROWS, W), float("-inf"), tl.float32)
        for it in tl.range(IT, loop_unroll_factor=UNROLL):
            cols = it * W + tl.arange(0, W)
            x, ok = _scores(s_ptr, m_ptr, row_off, mrow_off, k, cols, valid_row, scale, HAS_MASK, m_stride_k, False)
            lane_max = tl.maximum(lane_max, x)
            if STAGED:
                tl.store(s_ptr + row_off[:, None] + cols[None, :], x.to(tl.bfloat16), mask=ok)
        row_max = tl.reduce(lane_max, 1, tl.standard._elementwise_max)
    if STAGED:
        # the passes below may read these values from other threads (Triton picks each tensor's layout): wait
        # for the program's stores (bar.sync also orders its global memory).  Without it, k = 129 read
        # unscaled scores and gave NaN (H100, 2026-12-07).
        tl.debug_barrier()

    # each lane's sum, in its element order.  UNROLL: the same adds in the same order, but UNROLL iterations'
    # loads issue together instead of one cache round trip per element (64 per pass at k = 2048).
    acc = tl.full((ROWS, W), 0.0, tl.float32)  # tl.full: tl.zeros is a jit function (interpreter)
    for it in tl.range(IT, loop_unroll_factor=UNROLL):
        acc = _lane_sum(acc, it, s_ptr, m_ptr, row_off, mrow_off, k, valid_row, scale, row_max, HAS_MASK,
                        m_stride_k, W, STAGED, LIBDEVICE)
    # the xor butterfly: lane l += lane l ^ off for off = W/2 .. 1; lane 0's tree, as halves added pairwise
    for step in tl.static_range(LOG_W):
        acc = tl.reduce(tl.reshape(acc, (ROWS, 2, W >> (step + 1))), 1, tl.standard._sum_combine)  # one add
    total = tl.reshape(acc, (ROWS,))

    for it in tl.range(IT, loop_unroll_factor=UNROLL):
        _write_probs(it, s_ptr, m_ptr, row_off, mrow_off, k, valid_row, scale, row_max, total, HAS_MASK,
                     m_stride_k, W, STAGED, LIBDEVICE)


@functools.cache
def _kernel(interpret: bool):
    # k and the mask's strides are specialised (Triton notes which are multiples of 16): then the row loads are
    # 16-byte vectors, not one 2-byte load an element.  The row counts are not (one build for every batch).
    return jit(_eager_probs_kernel, interpret, ["n_rows", "n_h", "n_q"],
               helpers=(_rne_bf16, _expf, _scores, _lane_sum, _write_probs, _bf16_bits))


def row_bucket(k: int) -> int:
    """The next power of two >= ``k``: the unit in which ATen's warp softmax lays a row out (and this kernel
    is specialised)."""
    return 1 << max(k - 1, 0).bit_length()


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


def eager_probs_(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float, *, interpret: bool = False,
                 tuning: Tuning | None = None) -> None:
    """Replace BF16 ``scores`` ``[b, h, q, k]`` by ``softmax((scores * scaling) + mask, -1, float32).to(bf16)``
    in place, bit for bit as ATen computes it (module docstring).  The caller checks :func:`applies`."""
    b, h, q, k = scores.shape
    p = row_bucket(k)
    w = min(p, 32)
    n_rows = b * h * q
    if mask is None:
        m, strides = scores, (0, 0, 0, 0)
    else:
        m = mask
        strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    t = tuning or default_tuning()
    grid = (triton.cdiv(n_rows, t.rows),)
    _kernel(interpret)[grid](
        scores, m, n_rows, k, h, q, float(scaling), *strides,
        W=w, IT=p // w, LOG_W=w.bit_length() - 1, HAS_MASK=mask is not None, ROWS=t.rows, LIBDEVICE=not interpret,
        UNROLL=t.unroll, STAGED=t.staged, WHOLE=t.whole,
        num_warps=t.warps, enable_fp_fusion=False, enable_reflect_ftz=False,
    )
