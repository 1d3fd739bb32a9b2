"""Deprecated: the read core is ``streaming_adapters.read`` (``make_executor``, ``CpuExecutor``,
``CudaExecutor``).  ``BoxFiller`` is kept for users as a thin front of those executors:
host destinations go to the CPU executor, CUDA destinations to the CUDA executor.
"""

from __future__ import annotations

import warnings

import torch

from .read.boxes import DEFAULT_CHUNK_BYTES, FLOAT_DESTINATIONS, check_destination, iter_subboxes
from .read.cpu import CpuExecutor
from .read.executor import FillExecutor, make_executor
from .formats import LogicalTensor


class BoxFiller:
    """Deprecated front of :func:`streaming_adapters.read.make_executor`: one box per :meth:`fill` call."""

    def __init__(self, io, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        warnings.warn("streaming_adapters.fill.BoxFiller is deprecated: use streaming_adapters.read.make_executor",
                      DeprecationWarning, stacklevel=2)
        self.io = io
        self.chunk_bytes = int(chunk_bytes)
        self._cpu = CpuExecutor(io, self.chunk_bytes)
        self._by_device: dict[torch.device, FillExecutor] = {}
        self._checked = 0
        self._checked_quantized = 0

    def _executors(self) -> list[FillExecutor]:
        return [self._cpu, *self._by_device.values()]

    @property
    def tensors(self) -> int:
        return self._checked + sum(e.tensors for e in self._executors())

    @property
    def quantized(self) -> int:
        return self._checked_quantized + sum(e.quantized for e in self._executors())

    @property
    def peak_transient_bytes(self) -> int:
        return max(e.peak_transient_bytes for e in self._executors())

    def check(self, lt: LogicalTensor, length: tuple[int, ...], target: torch.Tensor,
              start: tuple[int, ...] | None = None) -> None:
        """Validate a destination box and count it (for boxes filled elsewhere)."""
        check_destination(lt, start, length, target)
        self._checked += 1
        self._checked_quantized += lt.scale is not None

    def fill(self, lt: LogicalTensor, start: tuple[int, ...], length: tuple[int, ...], target: torch.Tensor) -> None:
        """Fill ``target`` (shape ``length``) with the box ``[start, start + length)`` of ``lt``."""
        if target.device.type == "cpu":
            ex = self._cpu
        else:
            ex = self._by_device.get(target.device)
            if ex is None:
                ex = self._by_device[target.device] = make_executor(self.io, target.device,
                                                                    chunk_bytes=self.chunk_bytes)
        ex.fill([(lt, tuple(start), tuple(length), target)])


__all__ = ["BoxFiller", "DEFAULT_CHUNK_BYTES", "FLOAT_DESTINATIONS", "iter_subboxes"]
