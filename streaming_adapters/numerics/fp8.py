"""FP8 -> BF16/FP16/FP32 dequantization of a box of a tensor, in global block coordinates.

The one formula (formats.md §1.1)::

    out = (fp32(code) * fp32(scale[block of the element])).to(out.dtype)

``scale`` is the window of the scale grid that the box touches; ``box_start`` is the global coordinate of
the box's first element and ``win_start`` the global block index of the window's first entry, so an
element at local ``(r, c)`` uses ``scale[(r0 + r) // bm - wr0, (c0 + c) // bn - wc0]`` whatever the box's
alignment (TP shards of DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` start inside a 128-row block).

Two interchangeable paths, both exact by construction:

* **LUT (CPU)** -- an FP8 code has only 256 values, so each block's 256 possible outputs are computed with
  the formula itself and the output is a gather: ``out = table[block * 256 + code]``.  On the 2-core CI
  machine: 1.0 G elements/s vs 0.25 G/s for convert-multiply-round (128x128 blocks, 2048x7168 box).  Used
  when a sub-chunk has at least 256 elements per block it touches (otherwise building the tables costs more
  than it saves: group-32 scales).
* **multiply** -- ``fp32(code) * gathered scale``; the small-block CPU path and the GPU fallback.
* **Triton** (``numerics/triton_fp8.py``) -- the CUDA path whenever triton is importable: one kernel, no
  scratch, the same bits.

Memory: the largest scratch is one sub-chunk's int32 index (CPU: <= 1 MiB of elements -> 4 MiB) or, on the
multiply path, one fp32 copy of the sub-chunk; the caller bounds the box size (the chunk budget).
"""

from __future__ import annotations

import itertools

import torch

# CPU sub-chunk: ~256k elements keeps the int32 index (1 MiB) and its table in L2 -- 4x faster than
# processing a 2048x7168 box at once (measured: 1045 vs 441 M elements/s on the 2-core CI machine).
CPU_SUBCHUNK_ELEMS = 1 << 18
# GPU sub-chunk: large, to amortise launches (a 7168x7168 expert-free matrix is 51M elements).
GPU_SUBCHUNK_ELEMS = 1 << 26

_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def fp8_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 fp32 values of float8_e4m3fn codes 0..255 (NaN at 0x7F/0xFF, -0.0 at 0x80)."""
    device = torch.device(device)
    lut = _LUT_CACHE.get(device)
    if lut is None:
        lut = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).to(device)
        _LUT_CACHE[device] = lut
    return lut


def decode_scales(raw: torch.Tensor, encoding: str) -> torch.Tensor:
    """Stored scale values -> fp32 multipliers.  ``u8_exponent`` bytes mean ``2**(b-127)`` exactly like
    ``float8_e8m0fnu`` (0xFF is NaN), so they are reinterpreted, not converted."""
    if encoding == "u8_exponent":
        raw = raw.view(torch.float8_e8m0fnu)
    elif encoding not in ("float", "e8m0"):
        raise ValueError(f"unknown scale encoding {encoding!r}")
    return raw.to(torch.float32)


# The largest |value| an E4M3FN code decodes to (0x7E / 0xFE).
FP8_E4M3_MAX = 448.0


def scale_limit(out_dtype: torch.dtype) -> float:
    """The largest |scale| for which no code of the block can dequantize to Inf: ``448 * s`` must stay within
    both fp32 (where the product is formed) and ``out_dtype`` (where it is rounded).  BF16: 7.57e35; FP16: 146.2.
    No producer writes scales near this: the block's largest weight would be ``448 * s``."""
    return min(torch.finfo(torch.float32).max, torch.finfo(out_dtype).max) / FP8_E4M3_MAX


def first_bad_scale(scale: torch.Tensor, out_dtype: torch.dtype) -> tuple[int, ...] | None:
    """Index of the first scale that is NaN, infinite, or so large that ``448 * s`` overflows ``out_dtype``
    (a scale of 3e38, UE8M0 byte 254 = 2**127); ``None`` if every one is safe.  One vectorised pass over the
    window, which has one value per block (1/16384 of the codes for 128x128 blocks)."""
    ok = scale.abs() <= scale_limit(out_dtype)  # NaN compares False: refused too
    if bool(ok.all()):
        return None
    return tuple(int(i) for i in (~ok).nonzero()[0])


_NAN_SLICE_BYTES = 4 << 20  # rows per slice of the NaN check: a few MiB stays in the L2/L3 cache


def first_nan_code(codes: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN code (0x7F / 0xFF: the only NaNs of E4M3FN, which has no Inf) of a float8_e4m3fn
    box, any strides; ``None`` if there is none.  A NaN code times any scale is NaN, so a checkpoint holding one
    is damaged (producers saturate to 448).  ``(u8 & 0x7F) == 0x7F`` and ``any()`` in slices of ~4 MiB of rows:
    on a whole 64 MiB chunk the two temporaries were 128 MiB of fresh memory per chunk and the check a third of
    a load's time (cProfile, one Llama-70B layer, 0.52 of 1.62 s; 2-layer load on the 2-core CI machine,
    2 ranks, warm: 3.9 s, 2.31 GiB added per rank for a 2.08 GiB shard; 2026-12-07); sliced, they stay in cache.
    On the CUDA path it runs in the reader threads on the pinned host buffer, beside the GPU's work."""
    u8 = codes.view(torch.uint8)
    if u8.dim() == 0:
        u8 = u8.reshape(1)
    if u8.numel() == 0:
        return None
    rows = max(1, _NAN_SLICE_BYTES // max(1, u8[0].numel()))
    for a in range(0, u8.shape[0], rows):
        part = u8[a: a + rows]
        if not _maybe_nan(part):
            continue
        bad = (part & 0x7F) == 0x7F
        if bool(bad.any()):
            first = bad.nonzero()[0]
            return (a + int(first[0]), *(int(i) for i in first[1:]))
    return None


# SWAR over 8 codes per int64: a byte b has (b & 0x7F) == 0x7F iff ((b & 0x7F) + 1) sets its bit 7 (no carry
# leaves a byte: (b & 0x7F) + 1 <= 0x80).  3 int64 ops per 8 codes instead of 3 byte ops per code: a load of one
# Llama-70B layer (0.86 G codes, one process, 2-core CI machine, 2026-12-07) went from 1.62 to 1.39 s.
_LOW7 = 0x7F7F7F7F7F7F7F7F
_ONES = 0x0101010101010101
_HIGH = -0x7F7F7F7F7F7F7F80  # 0x8080808080808080 as a signed int64


def _maybe_nan(part: torch.Tensor) -> bool:
    """False only if ``part`` (uint8) certainly holds no 0x7F / 0xFF byte; True means: look byte by byte."""
    if not part.is_contiguous() or part.numel() % 8 or part.data_ptr() % 8:
        return True
    w = part.reshape(-1).view(torch.int64)
    return bool((((w & _LOW7) + _ONES) & _HIGH).any())


def block_window(
    start: tuple[int, ...], length: tuple[int, ...], block: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Global block indices ``[lo, hi)`` per dim that the box ``[start, start + length)`` touches."""
    lo = tuple(s // b for s, b in zip(start, block))
    hi = tuple(-(-(s + n) // b) if n else s // b for s, n, b in zip(start, length, block))
    return lo, hi


def dequantize_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    box_start: tuple[int, ...],
    block: tuple[int, ...],
    win_start: tuple[int, ...],
    method: str = "auto",
) -> int:
    """Write the dequantized ``codes`` into ``out`` (same shape, any strides, BF16/FP16/FP32).

    Args:
        out: destination box, e.g. a narrowed view of a DTensor's local shard.
        codes: float8_e4m3fn box, any strides, same device as ``out``.
        scale: fp32 window of the scale grid, ``ndim == codes.ndim`` (see :func:`block_window`).
        box_start: global coordinate of ``codes[0, ..., 0]``.
        block: block size per dim.
        win_start: global block index of ``scale[0, ..., 0]``.
        method: ``"auto"`` (Triton on CUDA, LUT on CPU where it pays, multiply elsewhere), ``"triton"``,
            ``"lut"`` or ``"multiply"``.

    Returns the largest scratch allocation in bytes (for the load report).
    """
    if out.shape != codes.shape:
        raise ValueError(f"out {tuple(out.shape)} and codes {tuple(codes.shape)} differ")
    if codes.numel() == 0:
        return 0
    if codes.is_cuda and method in ("auto", "triton"):
        from .triton_fp8 import dequantize_into_triton

        # The kernel needs no scratch and takes the whole box in one launch (no sub-chunks).
        if dequantize_into_triton(out, codes, scale, tuple(box_start), tuple(block), tuple(win_start)):
            return 0
        if method == "triton":
            raise ValueError("the Triton kernel cannot take these inputs (see triton_fp8.dequantize_into_triton)")
    if codes.ndim == 1:
        return dequantize_into(out[None], codes[None], scale[None], (0, *box_start), (1, *block), (0, *win_start),
                               method)
    if codes.ndim > 2:
        # Leading dims (stacked experts): one 2-D problem per leading index, with its scale slice.
        peak = 0
        for lead in itertools.product(*(range(d) for d in codes.shape[:-2])):
            s_idx = tuple((box_start[d] + i) // block[d] - win_start[d] for d, i in enumerate(lead))
            peak = max(peak, _dequant_2d(out[lead], codes[lead], scale[s_idx], box_start[-2:], block[-2:],
                                         win_start[-2:], method))
        return peak
    return _dequant_2d(out, codes, scale, box_start, block, win_start, method)


def _dequant_2d(out, codes, scale, box_start, block, win_start, method) -> int:
    rows, cols = codes.shape
    (r0, c0), (bm, bn), (wr0, wc0) = box_start, block, win_start
    dev = codes.device
    rb = torch.arange(r0, r0 + rows, device=dev) // bm - wr0  # window row of each local row
    cb = torch.arange(c0, c0 + cols, device=dev) // bn - wc0  # window col of each local col
    nc = scale.shape[1]
    cpu = dev.type == "cpu"
    step = max(1, (CPU_SUBCHUNK_ELEMS if cpu else GPU_SUBCHUNK_ELEMS) // cols)
    col_off = (cb * 256).to(torch.int32) if nc > 1 else None
    lut = fp8_values(dev)
    peak = 0
    u8 = codes.view(torch.uint8)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        i0 = (r0 + a) // bm - wr0
        i1 = (r0 + b - 1) // bm - wr0 + 1
        n_elems = (b - a) * cols
        n_blocks = (i1 - i0) * nc
        dst = out[a:b]
        use_lut = method == "lut" or (method == "auto" and cpu and n_blocks * 256 <= n_elems)
        if use_lut:
            table = (lut[None, :] * scale[i0:i1].reshape(-1, 1)).to(out.dtype).reshape(-1)
            idx = u8[a:b].to(torch.int32)
            if col_off is not None:
                idx += col_off
            if i1 - i0 > 1:
                idx += ((rb[a:b] - i0) * (nc * 256)).to(torch.int32)[:, None]
            if dst.is_contiguous():
                torch.index_select(table, 0, idx.view(-1), out=dst.view(-1))
                peak = max(peak, idx.nbytes + table.nbytes)
            else:
                vals = torch.index_select(table, 0, idx.view(-1))
                dst.copy_(vals.view(b - a, cols))
                peak = max(peak, idx.nbytes + table.nbytes + vals.nbytes)
        else:
            x = codes[a:b].to(torch.float32)
            s_rows = scale.index_select(0, rb[a:b])  # [r, nc]
            x.mul_(s_rows if nc == 1 else s_rows.index_select(1, cb))
            dst.copy_(x)
            peak = max(peak, 2 * x.nbytes)
    return peak

