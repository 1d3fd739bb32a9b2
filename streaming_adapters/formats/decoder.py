"""The box-decoder seam: how a box of a logical tensor is read and decoded when its stored codes are not
one FP8 element per logical element times a block grid (that case is ``numerics/fp8.py``'s, unchanged).

The box executors (``read.CpuExecutor`` on the host, ``read.CudaExecutor`` on CUDA) call a
:class:`BoxDecoder` for every box of a :class:`~streaming_adapters.formats.base.LogicalTensor` whose
``decoder`` is set, in four steps that never branch on the format::

    check_box(lt, start, length)             refuse a box that cannot be decoded alone (named error)
    split(start, length, max_elems)          sub-boxes the decoder can take (e.g. whole 16-column blocks)
    stored_box(start, length)                the codes' box in the stored tensor's coordinates
    read_scales(io, lt, start, length)       the scale window (CPU tensors) the sub-box needs
    decode_into(dst, codes, scales)          codes (on dst's device) -> dst, returns scratch bytes

Adding a format with its own packing is one decoder and one adapter; the executors stay as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from ..checkpoint.byteio import BoxReader
    from .base import LogicalTensor

Box = tuple[tuple[int, ...], tuple[int, ...]]


class BoxDecoder(ABC):
    """Reads and decodes boxes of one stored layout.  Instances are per tensor and immutable."""

    #: logical elements per stored element along the last dim (NVFP4: 2 codes per byte)
    elems_per_stored: int = 1

    @abstractmethod
    def check_box(self, lt: "LogicalTensor", start: tuple[int, ...], length: tuple[int, ...]) -> None:
        """Raise a :class:`~streaming_adapters.errors.CheckpointError` naming the box and what would work
        when ``[start, start + length)`` cannot be decoded on its own."""

    @abstractmethod
    def split(self, start: tuple[int, ...], length: tuple[int, ...], max_elems: int) -> Iterator[Box]:
        """Sub-boxes of at most ~``max_elems`` logical elements, each valid for :meth:`check_box`."""

    @abstractmethod
    def stored_box(self, start: tuple[int, ...], length: tuple[int, ...]) -> Box:
        """The box of ``lt.stored`` that holds the codes of the logical box."""

    @abstractmethod
    def read_scales(self, io: "BoxReader", lt: "LogicalTensor", start: tuple[int, ...],
                    length: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
        """``(window, extra)``: the block-scale window of the box as a float tensor (it travels through the
        GPU pipeline's fp32 scale buffers, so its values must be exact in fp32) and anything small the
        decode needs besides (e.g. a global scale).  Raises on scales that would decode to NaN / Inf."""

    @abstractmethod
    def decode_into(self, dst: torch.Tensor, codes: torch.Tensor, window: torch.Tensor, extra: Any) -> int:
        """Decode ``codes`` (the stored box, on ``dst``'s device) into ``dst``; returns scratch bytes."""
