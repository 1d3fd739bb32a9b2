"""Triton FP8(e4m3fn) -> BF16/FP16/FP32 dequantization of a 2-D box: the GPU path of
:func:`streaming_adapters.numerics.fp8.dequantize_into`, bit for bit.

The formula (formats.md §1.1), in global block coordinates::

    out[r, c] = (fp32(codes[r, c]) * scale[(r0 + r) // bm - wr0, (c0 + c) // bn - wc0]).to(out.dtype)

one fp32 product, then round-to-nearest-even (Triton's default for fp32 -> bf16/fp16 is RTNE, PTX
``cvt.rn``; we pass ``fp_downcast_rounding="rtne"`` to make that explicit).

Kernel shape.  One program per ``BLOCK_R x BLOCK_C`` tile of the box (1-D grid, row-major tile order, no
loop; default 64x128, 4 warps, 64 elements per thread).  The work is memory-bound (1 byte read + 2 written
per BF16 element, no arithmetic to speak of), so the design is "16-byte accesses, many bytes in flight,
almost no per-element integer work".  What the sm_90 SASS of the default BF16 variant shows (compiled
locally by Triton's bundled ptxas; 60 registers, no shared memory, no spills): 8 ``LDG.E.EF.64`` code
loads, 8 ``STG.E.128`` stores, 4 scalar scale loads per thread, and per element 1/2 ``F2FP.F16.E4M3``
+ 1 ``HADD2.F32`` (exact e4m3 -> fp32), 1 ``FMUL``, ~1 ``FSEL`` (the scale), 1/2 ``F2FP.BF16.F32`` (RNE):

* code loads are VEC bytes (8 for BF16/FP16 out, 4 for FP32), matching the 16-byte output stores, so the
  tile keeps one register layout; 16-byte code loads make Triton relayout through shared memory
  (``tile=(.., .., .., 16)`` selects that variant; ``benchmarks/bench_fp8_kernels.py --sweep`` times both);
* the scale index is never computed per element.  Rows and columns are separable: a tile whose rows span at
  most two row blocks (``bm >= BLOCK_R`` or a window with <= 2 block rows: "wide" rows) needs one
  comparison per row, not a division; likewise for columns.  A tile wide both ways loads 4 scalars
  (``s00 s01 s10 s11``) and picks per element with selects; per-channel ``(1, K)`` scales load one or two
  values per row; group ``(1, 32)`` gets 256x32 tiles (columns wide); only blocks under 32 columns that are
  also short (``7x5``) gather one scale per element (slower: a column-major gather layout, 106 registers);
* per-tile offsets are int64 scalars (``row_lo * stride``), in-tile offsets int32 vectors: no int64 math per
  element, and tensors over 2**31 elements work (the wrapper checks ``BLOCK_R * stride < 2**31``);
* ``out`` may be any view with unit inner stride (a narrow of a row-major local shard): its row stride is an
  argument.  Vector accesses need cols and both row strides to be multiples of VEC elements and 16-byte
  aligned bases; the wrapper checks that and passes those values divided by VEC (so the kernel's
  multiplication proves the divisibility to Triton).  Otherwise the kernel runs scalar accesses on 16x128
  tiles: correct, several times slower.

``SOFT=True`` decodes FP8 and rounds to BF16 with integer bit operations instead of the hardware
conversions.  It exists because Triton's CPU interpreter (``TRITON_INTERPRET``) decodes the NaN codes
0x7F/0xFF to 480.0 and truncates fp32 -> bf16 instead of rounding (triton 3.6
``runtime/interpreter.py::_convert_float``); it is also the path for GPUs without native FP8 conversions
(compute capability < 8.9).  Both paths are exact; the GPU test suite checks both bit for bit.

Memory: no scratch at all (the scale window is made contiguous if it is not: a few KB).
"""

from __future__ import annotations

import functools

import torch

from ._triton import jit, native_fp8, tl, triton, triton_available, triton_importable  # noqa: F401

# Default tile: 64x128 codes = 8 KiB read + 16 KiB written (BF16) per program, 64 elements per thread with
# 4 warps.  128 columns = one 128x128 block wide, so DeepSeek-style block scales take the 4-scalar path
# (bm=128 >= 64, bn=128 >= 128).  benchmarks/bench_fp8_kernels.py --sweep times the alternatives.
DEFAULT_TILE = (64, 128, 4)  # (BLOCK_R, BLOCK_C, num_warps)

_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_I32_MAX = 2**31 - 1


def _dequant_fp8_kernel(
    out_ptr, codes_ptr, scale_ptr,
    rows, cols_u, out_stride_u, codes_stride_u,
    r0, c0, bm, bn, wr0, wc0, gr, gc, n_col_tiles,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_WIDE: tl.constexpr, COL_WIDE: tl.constexpr,
    OUT_KIND: tl.constexpr, SOFT: tl.constexpr, VEC: tl.constexpr, CODES_VEC: tl.constexpr,
    UNIT: tl.constexpr, CODES_UNIT: tl.constexpr,
):  # fmt: skip
    # cols and codes_stride arrive divided by CODES_UNIT, out_stride by UNIT (the vector widths when the
    # wrapper found them aligned, else 1): multiplying back gives Triton's alignment analysis the
    # divisibility that allows vector accesses (tl.multiple_of on a kernel argument is silently dropped in
    # triton 3.6: an argument has no defining op to carry the hint).
    cols = cols_u * CODES_UNIT
    out_stride = out_stride_u * UNIT
    codes_stride = codes_stride_u * CODES_UNIT
    pid = tl.program_id(0)
    tr = pid // n_col_tiles
    row_lo = tr * BLOCK_R
    col_lo = (pid - tr * n_col_tiles) * BLOCK_C
    ri = tl.arange(0, BLOCK_R)
    # VEC = elements per 16-byte output access.  Capping the codes' vector width at VEC too (CODES_VEC ==
    # VEC: an 8-byte load for BF16) gives loads and stores one register layout; with CODES_VEC = 16 Triton
    # loads 16 codes per thread and moves them through shared memory (4 KB + 3 barriers per 64x128 tile
    # in the sm_90 SASS) to reach the 8-per-thread store layout.  benchmarks/bench_fp8_kernels.py --sweep times both.
    ci = tl.max_contiguous(tl.arange(0, BLOCK_C), VEC)
    rmask = (row_lo + ri) < rows
    cmask = (col_lo + ci) < cols
    mask = rmask[:, None] & cmask[None, :]

    # Codes first, so the bytes are in flight while the scale indices are worked out.
    c_tile = codes_ptr + row_lo.to(tl.int64) * codes_stride + col_lo
    if CODES_VEC == VEC:
        q = tl.load(c_tile + ri[:, None] * codes_stride + ci[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")
    else:
        cq = tl.max_contiguous(tl.arange(0, BLOCK_C), CODES_VEC)
        mask_q = rmask[:, None] & ((col_lo + cq) < cols)[None, :]
        q = tl.load(c_tile + ri[:, None] * codes_stride + cq[None, :], mask=mask_q, other=0,
                    eviction_policy="evict_first")

    # Window block index of each row / column, separably.  "Wide": the tile spans <= 2 blocks along that
    # dim, so the index is (first block) + (a comparison), no division per row / column.
    g_r = r0 + row_lo
    g_c = c0 + col_lo
    if ROW_WIDE:
        qr = g_r // bm
        r_next = (g_r - qr * bm + ri) >= bm  # [BR] row lies in block qr + 1
        sr0 = qr - wr0
        has_r1 = sr0 + 1 < gr
    else:
        sr = (g_r + ri) // bm - wr0  # [BR]
    if COL_WIDE:
        qc = g_c // bn
        c_next = (g_c - qc * bn + ci) >= bn  # [BC]
        sc0 = qc - wc0
        has_c1 = sc0 + 1 < gc
    else:
        sc = (g_c + ci) // bn - wc0  # [BC]

    if ROW_WIDE and COL_WIDE:
        s00 = tl.load(scale_ptr + sr0 * gc + sc0)
        s01 = tl.load(scale_ptr + sr0 * gc + sc0 + 1, mask=has_c1, other=0.0)
        s10 = tl.load(scale_ptr + (sr0 + 1) * gc + sc0, mask=has_r1, other=0.0)
        s11 = tl.load(scale_ptr + (sr0 + 1) * gc + sc0 + 1, mask=has_r1 & has_c1, other=0.0)
        top = tl.where(c_next, s01, s00)  # [BC]
        bot = tl.where(c_next, s11, s10)
        s = tl.where(r_next[:, None], bot[None, :], top[None, :])
    elif ROW_WIDE:
        top = tl.load(scale_ptr + sr0 * gc + sc, mask=cmask, other=0.0)  # [BC]
        bot = tl.load(scale_ptr + (sr0 + 1) * gc + sc, mask=cmask & has_r1, other=0.0)
        s = tl.where(r_next[:, None], bot[None, :], top[None, :])
    elif COL_WIDE:
        left = tl.load(scale_ptr + sr * gc + sc0, mask=rmask, other=0.0)  # [BR]
        right = tl.load(scale_ptr + sr * gc + sc0 + 1, mask=rmask & has_c1, other=0.0)
        s = tl.where(c_next[None, :], right[:, None], left[:, None])
    else:
        s = tl.load(scale_ptr + sr[:, None] * gc + sc[None, :], mask=mask, other=0.0)

    if SOFT:
        # e4m3fn bits s.eeee.mmm: a normal's fp32 bits are (e + 120) << 23 | m << 20; a subnormal is
        # m * 2**-9 (exact in fp32); 0x7F / 0xFF are NaN; the sign is bit 31 (0x80 -> -0.0).
        u = q.to(tl.int32)
        mag = u & 0x7F
        sub = (mag.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)
        bits = tl.where(mag < 8, sub, (mag << 20) + (120 << 23))
        bits = tl.where(mag == 0x7F, 0x7FC00000, bits) | ((u & 0x80) << 24)
        x = bits.to(tl.float32, bitcast=True)
    else:
        x = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    y = x * s  # the one fp32 product

    if OUT_KIND == 0:
        if SOFT:  # fp32 -> bf16 round-to-nearest-even on the bits; NaN -> canonical quiet NaN
            b = y.to(tl.uint32, bitcast=True)
            rb = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            rb = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rb)
            o = rb.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            o = y.to(tl.bfloat16, fp_downcast_rounding="rtne")
    elif OUT_KIND == 1:
        o = y.to(tl.float16, fp_downcast_rounding="rtne")
    else:
        o = y

    o_tile = out_ptr + row_lo.to(tl.int64) * out_stride + col_lo
    tl.store(o_tile + ri[:, None] * out_stride + ci[None, :], o, mask=mask)


# No integer specialisation (divisibility by 16, == 1): it would multiply compiled variants (~1 s each)
# and it only knows "divisible by 16", while a BF16 row needs 8 elements for 16-byte accesses.  The
# wrapper's UNIT carries the alignment that matters instead.  Pointers keep Triton's 16-byte specialisation.
_NO_SPECIALIZE = ["rows", "cols_u", "out_stride_u", "codes_stride_u", "r0", "c0", "bm", "bn", "wr0", "wc0", "gr",
                  "gc", "n_col_tiles"]


@functools.cache
def _kernel(interpret: bool):
    return jit(_dequant_fp8_kernel, interpret, _NO_SPECIALIZE)




def dequantize_into_triton(
    out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    box_start: tuple[int, ...],
    block: tuple[int, ...],
    win_start: tuple[int, ...],
    *,
    tile: tuple[int, ...] | None = None,
    soft: bool | None = None,
    interpret: bool = False,
) -> bool:
    """Same contract as :func:`fp8.dequantize_into`; returns False (having written nothing) when this path
    cannot take the inputs, so the caller falls back.

    Handled: float8_e4m3fn ``codes`` and fp32 ``scale`` on one CUDA device, BF16/FP16/FP32 ``out``, unit
    inner stride on ``out`` and ``codes`` (any row stride), 1-D / 2-D boxes (more dims: one launch per
    leading index).  Raises ValueError, like the reference, on a shape mismatch or a window that does not
    cover the box.

    Keyword-only, for tests and benchmarks: ``tile`` = (BLOCK_R, BLOCK_C, num_warps[, codes vector
    width in elements, default: the output's 16-byte vector]); ``soft`` forces the
    integer FP8 decode / BF16 rounding; ``interpret`` runs Triton's CPU interpreter on CPU tensors.
    """
    if not triton_importable() or not (interpret or triton_available()):
        return False
    if not interpret and not (out.is_cuda and codes.device == out.device and scale.device == out.device):
        return False
    if codes.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32 or out.dtype not in _OUT_KIND:
        return False
    if out.shape != codes.shape:
        raise ValueError(f"out {tuple(out.shape)} and codes {tuple(codes.shape)} differ")
    if scale.ndim != codes.ndim or not (len(box_start) == len(block) == len(win_start) == codes.ndim):
        return False
    if codes.numel() == 0:
        return True
    if codes.ndim == 1:
        return dequantize_into_triton(out[None], codes[None], scale[None], (0, *box_start), (1, *block),
                                      (0, *win_start), tile=tile, soft=soft, interpret=interpret)
    if codes.ndim > 2:
        if not _inner_ok(out) or not _inner_ok(codes):
            return False
        for i in range(codes.shape[0]):
            si = (box_start[0] + i) // block[0] - win_start[0]
            if not 0 <= si < scale.shape[0]:
                raise ValueError(f"scale window {tuple(scale.shape)} does not cover box dim 0 index {i}")
            ok = dequantize_into_triton(out[i], codes[i], scale[si], box_start[1:], block[1:], win_start[1:],
                                        tile=tile, soft=soft, interpret=interpret)
            if not ok:  # only possible before the first launch: every slice has the same properties
                return False
        return True
    return _launch_2d(out, codes, scale, box_start, block, win_start, tile, soft, interpret)


def _inner_ok(t: torch.Tensor) -> bool:
    return t.shape[-1] == 1 or t.stride(-1) == 1


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def pick_tile(block: tuple[int, int], window: tuple[int, int], aligned: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for a layout: keep one dim "wide" (the tile spans <= 2 blocks) so the
    scale is a select, not a per-element gather (a 2-D gather makes Triton pick a column-major layout
    for it: a shared-memory round trip per tile and ~4x the instructions per element in the sm_90 SASS;
    ``benchmarks/bench_fp8_sass.py`` prints each variant)."""
    (bm, bn), (gr, gc) = block, window
    if not aligned:  # scalar accesses, ~230 registers at 64 elements per thread: use 16
        return (16, 128, 4)
    br, bc, nw = DEFAULT_TILE
    if bn < bc and gc > 2 and bn >= 32:  # group scales (1, 32) / (1, 64): narrower, taller tiles
        bc = 1 << (bn.bit_length() - 1)
        br = br * DEFAULT_TILE[1] // bc
    elif bn < bc and gc > 2 and (bm < br and gr > 2):  # tiny blocks (7x5): the gather path, small tiles
        br, bc = 32, 64
    return br, bc, nw


def _launch_2d(out, codes, scale, box_start, block, win_start, tile, soft, interpret) -> bool:
    rows, cols = codes.shape
    (r0, c0), (bm, bn), (wr0, wc0) = box_start, block, win_start
    if min(bm, bn) <= 0 or min(r0, c0) < 0:
        raise ValueError(f"bad block {block} or box start {box_start}")
    if not _inner_ok(out) or not _inner_ok(codes):
        return False
    gr, gc = scale.shape
    lo_r, hi_r = r0 // bm - wr0, (r0 + rows - 1) // bm - wr0
    lo_c, hi_c = c0 // bn - wc0, (c0 + cols - 1) // bn - wc0
    if lo_r < 0 or lo_c < 0 or hi_r >= gr or hi_c >= gc:
        raise ValueError(
            f"scale window {tuple(scale.shape)} at block {tuple(win_start)} does not cover box "
            f"{tuple(codes.shape)} at {tuple(box_start)} with block {tuple(block)}"
        )
    out_stride, codes_stride = _row_stride(out), _row_stride(codes)
    vec = 16 // out.element_size()  # elements per 16-byte output access (8 for BF16)
    aligned = (
        cols % vec == 0 and out_stride % vec == 0 and codes_stride % vec == 0
        and out.data_ptr() % 16 == 0 and codes.data_ptr() % 16 == 0
    )  # fmt: skip
    block_r, block_c, num_warps, *rest = tile or pick_tile((bm, bn), (gr, gc), aligned)
    codes_vec = rest[0] if rest and aligned and cols % rest[0] == 0 and codes_stride % rest[0] == 0 else vec
    # In-tile offsets are int32: (BLOCK_R - 1) * stride + BLOCK_C and global coordinates must fit.
    if max(out_stride, codes_stride) * block_r + block_c > _I32_MAX or max(r0 + rows, c0 + cols) > _I32_MAX:
        return False
    if gr * gc > _I32_MAX:
        return False
    if soft is None:
        soft = interpret or not native_fp8(out.device.index if out.device.index is not None else 0)
    scale = scale.contiguous()
    unit, codes_unit = (vec, codes_vec) if aligned else (1, 1)
    n_col_tiles = triton.cdiv(cols, block_c)
    grid = (triton.cdiv(rows, block_r) * n_col_tiles,)
    args = (
        out, codes.view(torch.uint8), scale,
        rows, cols // codes_unit, out_stride // unit, codes_stride // codes_unit,
        r0, c0, bm, bn, wr0, wc0, gr, gc, n_col_tiles,
    )  # fmt: skip
    meta = dict(
        BLOCK_R=block_r, BLOCK_C=block_c,
        ROW_WIDE=bm >= block_r or gr <= 2, COL_WIDE=bn >= block_c or gc <= 2,
        OUT_KIND=_OUT_KIND[out.dtype], SOFT=bool(soft), VEC=vec, CODES_VEC=codes_vec,
        UNIT=unit, CODES_UNIT=codes_unit,
    )  # fmt: skip
    if interpret:
        _kernel(True)[grid](*args, **meta)
    else:
        with torch.cuda.device(out.device):
            _kernel(False)[grid](*args, **meta, num_warps=num_warps)
    return True
