"""Fill one destination box from a logical tensor: read the codes chunk by chunk, read only the scale
blocks each chunk touches, dequantize in global coordinates into the destination view.

Shared by the DCP reader (destination = a view of the rank's DTensor shard) and by conversion
(destination = a BF16 buffer of the rank's rows).  Memory: at most ``chunk_bytes`` of codes in flight, plus
the numerics' sub-chunk scratch (see ``numerics/fp8.py``); with the mmap backend on CPU the codes are
page-cache views and cost no anonymous memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint.byteio import BoxReader
from .errors import CorruptCheckpointError, DestinationError, ScaleLayoutError
from .formats import LogicalTensor
from .numerics.fp8 import (block_window, decode_scales, dequantize_into, first_bad_scale, first_nan_code,
                           scale_limit)

# 64 MiB of FP8 codes per chunk: large enough that per-chunk overhead (<1 ms) is noise at 1 GB/s, small
# enough to stay well inside the 64 MiB + chunk budget the memory bar allows.
DEFAULT_CHUNK_BYTES = 64 << 20
FLOAT_DESTINATIONS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class BoxFiller:
    """Fills boxes of logical tensors and keeps the counters a report needs."""

    def __init__(self, io: BoxReader, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1 << 16:
            raise ValueError(f"chunk_bytes={chunk_bytes} is below 64 KiB")
        self.io = io
        self.chunk_bytes = int(chunk_bytes)
        self.peak_transient_bytes = 0
        self.tensors = 0
        self.quantized = 0
        self._staging: torch.Tensor | None = None

    def check(self, lt: LogicalTensor, length: tuple[int, ...], target: torch.Tensor,
              start: tuple[int, ...] | None = None) -> None:
        """Validate a destination box and count it (also used when the GPU pipeline fills it)."""
        if tuple(target.shape) != tuple(length):
            raise DestinationError(
                f"destination box {list(target.shape)} differs from the planned box {list(length)}",
                file=lt.stored.file, tensor=lt.name, expected=f"{list(length)}",
                fix="report this as a bug with the destination's placements",
            )
        self.tensors += 1
        if lt.scale is not None:
            if target.dtype not in FLOAT_DESTINATIONS:
                raise DestinationError(
                    f"destination dtype {target.dtype} cannot hold a dequantized FP8 weight",
                    file=lt.stored.file, tensor=lt.name, expected="bfloat16, float16 or float32",
                    fix="allocate the destination in bfloat16 (or float32)",
                )
            self.quantized += 1
            if lt.decoder is not None:
                lt.decoder.check_box(lt, tuple(start if start is not None else (0,) * len(length)), tuple(length))

    def fill(
        self, lt: LogicalTensor, start: tuple[int, ...], length: tuple[int, ...], target: torch.Tensor
    ) -> None:
        """Fill ``target`` (shape ``length``) with the box ``[start, start + length)`` of ``lt``."""
        self.check(lt, length, target, start)
        if lt.decoder is not None:
            return self._fill_decoded(lt, start, length, target)
        device = target.device
        elem = lt.stored.itemsize
        # CUDA: codes (1 B) + the multiply path's fp32 copy and gathered scale (8 B) per element.
        per_elem = elem + (8 if device.type != "cpu" and lt.scale is not None else 0)
        max_elems = max(1, self.chunk_bytes // per_elem)
        pinned = self.io.backend == "pread" and device.type == "cuda"
        for sub_start, sub_len in iter_subboxes(start, length, max_elems):
            dst = _narrow(target, tuple(s - s0 for s, s0 in zip(sub_start, start)), sub_len)
            src = self.io.read(lt.stored, sub_start, sub_len,
                               out=self._staging_for(math.prod(sub_len) * elem, max_elems * elem) if pinned else None)
            transient = 0 if (self.io.backend == "mmap" and device.type == "cpu") else src.nbytes
            codes_host = src  # NaN codes are checked on the host copy, before any transfer
            if device.type != "cpu":
                src = src.to(device, non_blocking=pinned)
            if lt.scale is None:
                dst.copy_(src)
                self.peak_transient_bytes = max(self.peak_transient_bytes, transient)
                continue
            lo, hi = block_window(sub_start, sub_len, lt.scale.block)
            raw = self.io.read(lt.scale.tensor, lo, tuple(h - l for h, l in zip(hi, lo)))
            scale = decode_scales(raw, lt.scale.encoding)
            _check_finite(scale, lt, lo, self.io.root, target.dtype)
            _check_codes(codes_host, lt, sub_start, self.io.root)
            scratch = dequantize_into(dst, src, scale.to(device), sub_start, lt.scale.block, lo)
            if pinned:
                torch.cuda.current_stream(device).synchronize()  # the staging buffer is reused next chunk
            self.peak_transient_bytes = max(self.peak_transient_bytes, transient + scratch + scale.nbytes)

    def _fill_decoded(self, lt: LogicalTensor, start, length, target: torch.Tensor) -> None:
        """Layouts with their own decoder (formats/decoder.py: NVFP4): same chunking, the decoder's boxes."""
        dec = lt.decoder
        device = target.device
        # Codes (1/elems_per_stored B per element) + on CUDA the decode's scratch (fp32 multipliers: ~nothing).
        max_elems = max(1, self.chunk_bytes * dec.elems_per_stored // lt.stored.itemsize)
        for sub_start, sub_len in dec.split(tuple(start), tuple(length), max_elems):
            dst = _narrow(target, tuple(s - s0 for s, s0 in zip(sub_start, start)), sub_len)
            src = self.io.read(lt.stored, *dec.stored_box(sub_start, sub_len))
            transient = 0 if (self.io.backend == "mmap" and device.type == "cpu") else src.nbytes
            window, extra = dec.read_scales(self.io, lt, sub_start, sub_len)
            scratch = dec.decode_into(dst, src.to(device) if device.type != "cpu" else src, window, extra)
            self.peak_transient_bytes = max(self.peak_transient_bytes, transient + scratch + window.nbytes)

    def _staging_for(self, nbytes: int, capacity: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(max(nbytes, capacity), dtype=torch.uint8, pin_memory=True)
        return self._staging


def iter_subboxes(
    start: tuple[int, ...], length: tuple[int, ...], max_elems: int
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split a box into sub-boxes of at most ``max_elems`` elements, outermost dims first, so each
    sub-box is a contiguous run of rows whenever the box spans whole rows."""
    n = math.prod(length)
    if n <= max_elems or not length:
        yield start, length
        return
    inner = math.prod(length[1:])
    if inner <= max_elems:
        step = max_elems // inner
        for a in range(0, length[0], step):
            k = min(step, length[0] - a)
            yield (start[0] + a, *start[1:]), (k, *length[1:])
        return
    for a in range(length[0]):
        for s, l in iter_subboxes(start[1:], length[1:], max_elems):
            yield (start[0] + a, *s), (1, *l)


def _narrow(t: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


def _check_finite(scale: torch.Tensor, lt: LogicalTensor, lo: tuple[int, ...], root: Path,
                  out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse a scale window with a NaN, an Inf, or a value that makes some code overflow ``out_dtype``."""
    bad = first_bad_scale(scale, out_dtype)
    if bad is None:
        return
    block = tuple(b + l for b, l in zip(bad, lo))
    value = float(scale[bad])
    where = dict(file=str(root / lt.scale.tensor.file), tensor=lt.scale.tensor.name,
                 expected=f"finite scales of magnitude at most {scale_limit(out_dtype):.4g}")
    if not math.isfinite(value):
        raise ScaleLayoutError(
            f"scale is {value} (not finite) at block {list(block)}: the weights of that block would be NaN/Inf",
            **where, fix="the checkpoint is damaged; re-download or re-export it",
        )
    raise ScaleLayoutError(
        f"scale is {value:g} at block {list(block)}: times the FP8 maximum 448 it overflows {out_dtype}, the "
        "weights of that block would be Inf",
        **where, fix="the checkpoint is damaged (no producer writes such a scale); re-download or re-export it",
    )


def _check_codes(codes: torch.Tensor, lt: LogicalTensor, box_start: tuple[int, ...], root: Path) -> None:
    """Refuse NaN codes (0x7F / 0xFF) before they become NaN weights; on the host copy, before any transfer."""
    bad = first_nan_code(codes)
    if bad is None:
        return
    where = [s + i for s, i in zip(box_start, bad)]
    raise CorruptCheckpointError(
        f"FP8 code {int(codes.view(torch.uint8)[bad]):#04x} at element {where} is NaN in float8_e4m3fn",
        file=str(root / lt.stored.file), tensor=lt.name,
        expected="codes other than 0x7f / 0xff (producers saturate to +-448, codes 0x7e / 0xfe)",
        fix="the checkpoint is damaged; re-download or re-export it",
    )
