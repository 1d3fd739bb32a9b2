"""The CPU back end: host destinations, chunk by chunk on the calling thread.

Per chunk: read the codes (``pread`` into one reusable staging buffer, or an mmap view), read only the scale
blocks the chunk touches, check them, dequantize in global block coordinates into the destination view.

Memory: ``pread`` (the default) stages codes in ONE buffer of at most ``chunk_bytes`` (64 MiB): sized for the
largest chunk of a :meth:`fill` call before its first read and reused by every chunk, never one per chunk; ``mmap`` reads page-cache
views and costs no anonymous memory, but a file truncated while a chunk is being read kills the process with
SIGBUS (``checkpoint/byteio.py``).  Plus the numerics' sub-chunk scratch (~5 MiB, ``numerics/fp8.py``).
"""

from __future__ import annotations

import math
import os

import torch

from .boxes import DEFAULT_CHUNK_BYTES, Chunk, check_codes, read_scale_window, split_job
from .executor import FillExecutor, Job
from ..numerics.fp8 import dequantize_into


class CpuExecutor(FillExecutor):
    """Fills host destinations (any device works, but CUDA destinations belong to ``CudaExecutor``)."""

    overlapped = False

    def __init__(self, io, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(io, chunk_bytes)
        self._staging: torch.Tensor | None = None
        self.staging_allocations = 0  # how often the staging buffer was (re)allocated: 1 in a steady load
        # A byte source that is already host memory (the deprecated nemo TemporaryBoxes, tests/test_read_core.py)
        # has no "pread" to stage.
        self._stages = getattr(io, "backend", "mmap") == "pread"

    def _fill(self, jobs: list[Job]) -> None:
        chunks = [c for lt, s, n, t in jobs
                  for c in split_job(lt, s, n, t, max(1, self.chunk_bytes // lt.stored.itemsize))]
        if self._stages and chunks:
            self._staging_for(max(c.nbytes for c in chunks))  # once per call, sized for its largest chunk
        for c in chunks:
            self._chunk(c)

    def _codes(self, c: Chunk) -> torch.Tensor:
        start, length = c.stored
        if not self._stages:
            return self.io.read(c.lt.stored, start, length)
        return self.io.read(c.lt.stored, start, length, out=self._staging_for(c.nbytes))

    def read_stored(self, lt, start=None, length=None) -> torch.Tensor:
        """pread: into the staging buffer when the box fits ``chunk_bytes`` (no allocation per call)."""
        start = tuple(start) if start is not None else (0,) * len(lt.stored.shape)
        length = tuple(length) if length is not None else tuple(lt.stored.shape)
        nbytes = math.prod(length) * lt.stored.itemsize
        if not self._stages or nbytes > self.chunk_bytes:
            return self.io.read(lt.stored, start, length)
        return self.io.read(lt.stored, start, length, out=self._staging_for(nbytes))

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            # Exactly the largest chunk of the fill call (<= chunk_bytes, split_job's bound), so that the
            # pre-flight's estimate (min(chunk_bytes, the largest box), preflight.py) is a true bound.
            self._staging = None  # free the old buffer before taking the new one
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
            self.staging_allocations += 1
        return self._staging

    def _chunk(self, c: Chunk) -> None:
        lt = c.lt
        src = self._codes(c)
        _test_point("read-chunk")  # tests: a shard truncated between a chunk's read and its dequantization
        staged = self._staging.numel() if self._stages else 0
        if lt.decoder is not None:  # layouts with their own decoder (formats/decoder.py: NVFP4)
            window, extra = lt.decoder.read_scales(self.io, lt, c.start, c.length)
            scratch = lt.decoder.decode_into(c.dst, src, window, extra)
            self.counters.peak(staged + scratch + window.nbytes)
            return
        if lt.scale is None:
            c.dst.copy_(src)
            self.counters.peak(staged)
            return
        lo, scale = read_scale_window(self.io, c, c.dst.dtype)
        check_codes(src, lt, c.start, self.io.root)
        scratch = dequantize_into(c.dst, src, scale, c.start, lt.scale.block, lo)
        self.counters.peak(staged + scratch + scale.nbytes)


def _test_point(name: str) -> None:
    """``convert/staging.kill_point`` when a test set ``$STREAMING_ADAPTERS_TEST_KILL_AT`` (one dict lookup
    per chunk otherwise, ~0.1 us against a chunk's milliseconds); imported late: convert imports this package."""
    if "STREAMING_ADAPTERS_TEST_KILL_AT" in os.environ:
        from ..convert.staging import kill_point

        kill_point(name)
