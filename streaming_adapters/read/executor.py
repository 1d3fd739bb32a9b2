"""The one interface that turns checkpoint bytes into destination values, and the one place that picks its
back end.

:class:`FillExecutor` fills a list of jobs ``(LogicalTensor, start, length, target)`` and keeps the counters a
report needs.  Two implementations: :class:`~.cpu.CpuExecutor` (host destinations, chunk by chunk on the
calling thread) and :class:`~.cuda.CudaExecutor` (reader threads, pinned ring, copy stream, Triton).
:func:`make_executor` chooses; no caller writes the choice itself.
"""

from __future__ import annotations

import abc
import threading
import time
from typing import Sequence

import torch

from .boxes import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES, Job, check_destination


class FillCounters:
    """Counters of one executor.  ``add`` / ``peak`` take a lock: the CUDA executor's reader threads update
    ``read_s`` concurrently (an unsynchronised ``+=`` on a float loses updates between threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tensors = 0
        self.quantized = 0
        self.bytes_read = 0
        self.peak_transient_bytes = 0
        self.timings: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self.timings[name] = self.timings.get(name, 0) + value

    def peak(self, nbytes: int) -> None:
        with self._lock:
            self.peak_transient_bytes = max(self.peak_transient_bytes, int(nbytes))


class FillExecutor(abc.ABC):
    """Fills destination boxes from one byte source (``checkpoint/byteio.BoxReader`` or anything with its
    ``read`` / ``root`` / ``backend``).

    Capability flag:
        overlapped: ``True`` when one :meth:`fill` call over many jobs overlaps their reads with compute
            (the CUDA pipeline), so callers should batch a step's jobs into one call; ``False`` (CPU) when
            jobs are filled one after the other and batching only holds memory longer.
    """

    overlapped: bool = False

    def __init__(self, io, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < MIN_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} is below 64 KiB")
        self.io = io
        self.chunk_bytes = int(chunk_bytes)
        self.counters = FillCounters()

    def fill(self, jobs: Sequence[Job]) -> None:
        """Fill every job's target; on return every value is in place (CUDA: on the current stream).
        Every destination is checked before any byte is read."""
        jobs = list(jobs)
        for lt, start, length, target in jobs:
            check_destination(lt, start, length, target)
        before = getattr(self.io, "bytes_read", 0)
        t0 = time.perf_counter()
        try:
            self._fill(jobs)
        finally:
            self.counters.add("fill_s", time.perf_counter() - t0)
            with self.counters._lock:
                self.counters.bytes_read += getattr(self.io, "bytes_read", 0) - before
        self.counters.tensors += len(jobs)
        self.counters.quantized += sum(1 for lt, *_ in jobs if lt.scale is not None)

    @abc.abstractmethod
    def _fill(self, jobs: list[Job]) -> None:
        """Fill checked jobs."""

    def read_stored(self, lt, start: tuple[int, ...] | None = None, length: tuple[int, ...] | None = None):
        """The stored bytes of a box of a plain (unquantized) tensor as a host tensor, for copying them
        as they are (conversion's "copy" outputs).  Valid until the next call on this executor."""
        return self.io.read(lt.stored, start, length)

    # Report counters, as attributes (what reports and the deprecated BoxFiller / GpuPipeline exposed).
    tensors = property(lambda self: self.counters.tensors, doc="jobs filled")
    quantized = property(lambda self: self.counters.quantized, doc="jobs of FP8 (scaled) tensors")
    bytes_read = property(lambda self: self.counters.bytes_read, doc="bytes read from the source by fills")
    peak_transient_bytes = property(lambda self: self.counters.peak_transient_bytes,
                                    doc="the largest transient (staging + scratch) of any chunk")

    def timings(self) -> dict[str, float]:
        with self.counters._lock:
            return dict(self.counters.timings)


def make_executor(io, device: torch.device | str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  gpu_pipeline: bool | str = "auto", readers: int = 8) -> FillExecutor:
    """The executor for destinations on ``device`` -- the one place the back end is chosen.

    ``gpu_pipeline``:
        ``"auto"`` (default): CUDA destinations get the overlapped pipeline (``readers`` threads, 8 pinned
            slots, 3 device slots), host destinations the CPU executor.
        ``True``: the pipeline on any device, CPU included (tests of its logic without a GPU).
        ``False``: no overlap.  On CUDA that is the pipeline with one reader thread and one slot of each ring
            (read, copy, dequantize one chunk after the other: what the removed synchronous CUDA branch of
            ``BoxFiller`` did, with the same Triton kernel and checks); on CPU, the CPU executor.
    """
    from .cpu import CpuExecutor
    from .cuda import DEFAULT_PIPELINE_CHUNK, CudaExecutor

    device = torch.device(device)
    if gpu_pipeline not in (True, False, "auto"):
        raise ValueError(f"gpu_pipeline must be True, False or 'auto', got {gpu_pipeline!r}")
    if device.type == "cuda" or gpu_pipeline is True:
        chunk = min(chunk_bytes, DEFAULT_PIPELINE_CHUNK)
        if gpu_pipeline is False:
            return CudaExecutor(io, device, chunk_bytes=chunk, depth=1, host_depth=1, readers=1)
        return CudaExecutor(io, device, chunk_bytes=chunk, readers=readers)
    return CpuExecutor(io, chunk_bytes)
