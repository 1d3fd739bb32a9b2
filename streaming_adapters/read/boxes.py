"""Box and chunk geometry, and the checks every back end applies before a value reaches a destination.

A *job* is ``(LogicalTensor, start, length, target)``: fill ``target`` (shape ``length``) with the box
``[start, start + length)`` of the logical tensor, in global coordinates.  A job is cut into *chunks* of at
most ``chunk_bytes`` stored bytes (:func:`split_job`); each chunk reads its codes and only the scale blocks it
touches (:func:`read_scale_window`).  One copy of all of this, used by ``cpu.py`` and ``cuda.py`` alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptCheckpointError, DestinationError, ScaleLayoutError
from ..formats import LogicalTensor
from ..numerics.fp8 import block_window, decode_scales, first_bad_scale, first_nan_code, scale_limit

# 64 MiB of FP8 codes per chunk: large enough that per-chunk overhead (<1 ms) is noise at 1 GB/s, small
# enough to stay well inside the 64 MiB + chunk budget the memory bar allows.
DEFAULT_CHUNK_BYTES = 64 << 20
# Below 64 KiB the per-chunk Python overhead (~20 us) dominates the read of the chunk itself.
MIN_CHUNK_BYTES = 1 << 16
FLOAT_DESTINATIONS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

Job = tuple[LogicalTensor, tuple[int, ...], tuple[int, ...], torch.Tensor]


@dataclass
class Chunk:
    """One piece of a job: its box in logical coordinates and the view of the destination it fills."""

    lt: LogicalTensor
    start: tuple[int, ...]
    length: tuple[int, ...]
    dst: torch.Tensor

    @property
    def stored(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The chunk's box in the stored tensor (the decoder's coordinates for NVFP4)."""
        return self.lt.decoder.stored_box(self.start, self.length) if self.lt.decoder else (self.start, self.length)

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored[1]) * self.lt.stored.itemsize

    @property
    def scale_elems(self) -> int:
        if self.lt.scale is None:
            return 0
        lo, hi = block_window(self.start, self.length, self.lt.scale.block)
        return math.prod(h - l for h, l in zip(hi, lo))


def check_destination(lt: LogicalTensor, start: tuple[int, ...] | None, length: tuple[int, ...],
                      target: torch.Tensor) -> None:
    """Refuse a destination whose shape is not the planned box, or whose dtype cannot hold a dequantized
    value; a decoder (NVFP4) also checks the box against its groups."""
    if tuple(target.shape) != tuple(length):
        raise DestinationError(
            f"destination box {list(target.shape)} differs from the planned box {list(length)}",
            file=lt.stored.file, tensor=lt.name, expected=f"{list(length)}",
            fix="report this as a bug with the destination's placements",
        )
    if lt.scale is None:
        return
    if target.dtype not in FLOAT_DESTINATIONS:
        raise DestinationError(
            f"destination dtype {target.dtype} cannot hold a dequantized FP8 weight",
            file=lt.stored.file, tensor=lt.name, expected="bfloat16, float16 or float32",
            fix="allocate the destination in bfloat16 (or float32)",
        )
    if lt.decoder is not None:
        lt.decoder.check_box(lt, tuple(start if start is not None else (0,) * len(length)), tuple(length))


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


def narrow(t: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    """The view ``t[offsets : offsets + lengths]`` (no copy; dims already whole are left alone)."""
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


def split_job(lt: LogicalTensor, start, length, target: torch.Tensor, max_stored: int) -> list[Chunk]:
    """A job as chunks of at most ``max_stored`` stored elements (a decoder's packed bytes for NVFP4)."""
    start, length = tuple(start), tuple(length)
    if lt.decoder is not None:
        split, max_elems = lt.decoder.split, max_stored * lt.decoder.elems_per_stored
    else:
        split, max_elems = iter_subboxes, max_stored
    return [Chunk(lt, s, n, narrow(target, tuple(a - b for a, b in zip(s, start)), n))
            for s, n in split(start, length, max_elems)]


def read_scale_window(io, c: Chunk, out_dtype: torch.dtype) -> tuple[tuple[int, ...], torch.Tensor]:
    """The scale blocks chunk ``c`` touches, decoded to fp32 and checked: ``(first block index, window)``."""
    lo, hi = block_window(c.start, c.length, c.lt.scale.block)
    raw = io.read(c.lt.scale.tensor, lo, tuple(h - l for h, l in zip(hi, lo)))
    scale = decode_scales(raw, c.lt.scale.encoding)
    check_finite(scale, c.lt, lo, io.root, out_dtype)
    return lo, scale


def check_finite(scale: torch.Tensor, lt: LogicalTensor, lo: tuple[int, ...], root: Path,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse a scale window with a NaN, an Inf, or a value that makes some code overflow ``out_dtype``."""
    bad = first_bad_scale(scale, out_dtype)
    if bad is None:
        return
    block = tuple(b + l for b, l in zip(bad, lo))
    value = float(scale[bad])
    where = dict(file=str(Path(root) / lt.scale.tensor.file), tensor=lt.scale.tensor.name,
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


def check_codes(codes: torch.Tensor, lt: LogicalTensor, box_start: tuple[int, ...], root: Path) -> None:
    """Refuse NaN codes (0x7F / 0xFF) before they become NaN weights; on the host copy, before any transfer."""
    bad = first_nan_code(codes)
    if bad is None:
        return
    where = [s + i for s, i in zip(box_start, bad)]
    raise CorruptCheckpointError(
        f"FP8 code {int(codes.view(torch.uint8)[bad]):#04x} at element {where} is NaN in float8_e4m3fn",
        file=str(Path(root) / lt.stored.file), tensor=lt.name,
        expected="codes other than 0x7f / 0xff (producers saturate to +-448, codes 0x7e / 0xfe)",
        fix="the checkpoint is damaged; re-download or re-export it",
    )
