"""Deprecated: the GPU pipeline is ``streaming_adapters.read.CudaExecutor`` (chosen by ``make_executor``).
``GpuPipeline``, ``Chunk`` and ``split_box`` are kept for users."""

from __future__ import annotations

import warnings

import torch

from .read.boxes import Chunk, check_destination, split_job
from .read.cuda import DEFAULT_DEPTH, DEFAULT_HOST_DEPTH, DEFAULT_PIPELINE_CHUNK, DEFAULT_READERS, CudaExecutor
from .formats import LogicalTensor


def split_box(lt: LogicalTensor, start, length, target: torch.Tensor, max_elems: int) -> list[Chunk]:
    """Deprecated name of :func:`streaming_adapters.read.split_job` (checks the destination first)."""
    check_destination(lt, start, length, target)
    return split_job(lt, start, length, target, max_elems)


class GpuPipeline(CudaExecutor):
    """Deprecated name of :class:`streaming_adapters.read.CudaExecutor`; ``run(split_box(...))`` still works,
    ``fill(jobs)`` is the API."""

    def __init__(self, *args, **kwargs) -> None:
        warnings.warn("streaming_adapters.pipeline.GpuPipeline is deprecated: use streaming_adapters.read",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)

    @property
    def chunks(self) -> int:
        return int(self.timings()["chunks"])

    @property
    def read_s(self) -> float:
        return self.timings()["read_s"]


__all__ = ["Chunk", "DEFAULT_DEPTH", "DEFAULT_HOST_DEPTH", "DEFAULT_PIPELINE_CHUNK", "DEFAULT_READERS",
           "GpuPipeline", "split_box"]
