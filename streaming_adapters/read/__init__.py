"""The read core: the only code that turns checkpoint bytes into destination values.

``boxes.py`` (job/chunk geometry and the shared checks), ``executor.py`` (the :class:`FillExecutor` interface
and :func:`make_executor`, the one place a back end is chosen), ``cpu.py`` and ``cuda.py`` (its two back ends).
The bytes come from ``checkpoint/byteio.BoxReader`` (``pread`` by default, ``mmap`` selectable).
"""

from .boxes import (DEFAULT_CHUNK_BYTES, FLOAT_DESTINATIONS, Chunk, Job, check_codes, check_destination,
                    check_finite, iter_subboxes, narrow, read_scale_window, split_job)
from .cpu import CpuExecutor
from .cuda import DEFAULT_DEPTH, DEFAULT_HOST_DEPTH, DEFAULT_PIPELINE_CHUNK, DEFAULT_READERS, CudaExecutor
from .executor import FillCounters, FillExecutor, make_executor
from ..checkpoint.byteio import DEFAULT_BACKEND

__all__ = ["DEFAULT_BACKEND", "DEFAULT_CHUNK_BYTES", "DEFAULT_DEPTH", "DEFAULT_HOST_DEPTH", "DEFAULT_PIPELINE_CHUNK",
           "DEFAULT_READERS", "FLOAT_DESTINATIONS", "Chunk", "CpuExecutor", "CudaExecutor", "FillCounters",
           "FillExecutor", "Job", "check_codes", "check_destination", "check_finite", "iter_subboxes",
           "make_executor", "narrow", "read_scale_window", "split_job"]
