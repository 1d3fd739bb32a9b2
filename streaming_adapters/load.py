"""``load_fp8_state_dict``: plan and validate on every rank, then one ``dcp.load`` with our reader.

Phases (every rank of the group takes part in each collective, whatever keys it holds):

1. plan -- open the headers, pick the adapter, match the rank's keys, shapes and dtypes against the
   checkpoint; no tensor byte is read.  Errors are gathered so that every rank raises the same error.
2. load -- ``torch.distributed.checkpoint.load`` with :class:`StreamingFP8StorageReader`.  DCP wraps
   failures in ``CheckpointException`` (a ``BaseException``); we unwrap it into our own error.
3. report -- per-rank stats are all-gathered into one :class:`LoadReport`.
"""

from __future__ import annotations

import difflib
import os
import time
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from .checkpoint.index import CheckpointIndex
from .checkpoint.coverage import check_coverage
from .dist import all_gather_object, is_dist, raise_gathered, raise_on_all_ranks, rank_and_world
from .errors import CheckpointError, DestinationError
from .formats import get_adapter
from .read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES, FLOAT_DESTINATIONS
from .reader import StreamingFP8StorageReader
from .report import LoadReport, MemoryMonitor, RankStats


def load_fp8_state_dict(
    state_dict: dict[str, Any],
    checkpoint_path: str | os.PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    strict: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_backend: str = DEFAULT_BACKEND,
    gpu_pipeline: bool | str = "auto",
    readers: int = 8,
    verbose: bool = False,
) -> LoadReport:
    """Fill ``state_dict`` in place from an FP8 (or plain) Hugging Face safetensors checkpoint.

    Args:
        state_dict: checkpoint key -> BF16/FP16/FP32 tensor or DTensor (any placements).  Each rank
            passes the keys it holds (pipeline stages may differ, or pass ``{}``).  Scale keys
            (``*.weight_scale_inv``, ``*.input_scale``...) may be requested too; they load as stored.
        checkpoint_path: the checkpoint folder.
        process_group: the group every member of which calls this function (default: the world).
        strict: a requested key missing from the checkpoint is an error (else it is skipped and listed in
            ``report.missing``).
        chunk_bytes: the most FP8 code bytes in flight per rank, whatever the tensor size.
        io_backend: ``"pread"`` (default: exact byte reads, no readahead, one reusable staging buffer of
            ``chunk_bytes``) or ``"mmap"`` (page-cache views, no staging buffer; a shard truncated during
            the load can kill the process with SIGBUS).
        gpu_pipeline / readers: CUDA destinations overlap reads (``readers`` threads), host-to-device
            copies and dequantization (``streaming_adapters.read.CudaExecutor``); ``True`` forces it on
            CPU; ``False`` runs it with one reader and one slot (no overlap).
        verbose: print the summary line on rank 0.

    Returns:
        the :class:`LoadReport` (this rank's numbers plus every rank's in ``report.ranks``).
    """
    rank, world = rank_and_world(process_group)
    t0 = time.perf_counter()
    # -- 1. plan ----------------------------------------------------------------------------------
    error: BaseException | None = None
    reader = None
    missing: list[str] = []
    try:
        index = CheckpointIndex.open(checkpoint_path, allow_pieces=True)
        check_coverage(index)
        adapter = get_adapter(checkpoint_path, index=index)
        hidden_wanted = {k for k in state_dict if k in adapter.plan.hidden}
        reader = StreamingFP8StorageReader(
            checkpoint_path, index=index, adapter=adapter, chunk_bytes=chunk_bytes,
            io_backend=io_backend, include_hidden=hidden_wanted, gpu_pipeline=gpu_pipeline, readers=readers,
        )
        missing = _validate_destinations(state_dict, reader, strict)
    except CheckpointError as e:
        error = e
    raise_on_all_ranks(error, process_group)
    assert reader is not None
    t_plan = time.perf_counter() - t0
    request = {k: v for k, v in state_dict.items() if k not in set(missing)}
    device = _device_of(request)
    # -- 2. load ----------------------------------------------------------------------------------
    with MemoryMonitor(device) as mem:
        dcp_load(request, reader, DefaultLoadPlanner(allow_partial_load=not strict), process_group)
    seconds = time.perf_counter() - t0
    reader.timings.update(plan_s=t_plan, load_s=seconds - t_plan)
    # -- 3. report --------------------------------------------------------------------------------
    mine = RankStats(
        rank=rank, tensors=reader.tensors_read, quantized=reader.quantized_read,
        plain=reader.tensors_read - reader.quantized_read, bytes_read=reader.bytes_read,
        seconds=seconds, peak_transient_bytes=reader.peak_transient_bytes,
        peak_host_bytes=mem.peak_host, host_bytes_at_start=mem.start_host,
        peak_gpu_bytes=mem.peak_gpu if device is not None and device.type == "cuda" else None,
        gpu_bytes_at_start=mem.start_gpu if device is not None and device.type == "cuda" else None,
        timings=dict(reader.timings),
    )
    report = LoadReport(
        checkpoint=str(index.path), adapter=adapter.name, world_size=world, rank=rank,
        io_backend=io_backend, chunk_bytes=chunk_bytes, tensors=mine.tensors, quantized=mine.quantized,
        plain=mine.plain, bytes_read=mine.bytes_read, seconds=seconds,
        peak_transient_bytes=mine.peak_transient_bytes, peak_host_bytes=mine.peak_host_bytes,
        peak_gpu_bytes=mine.peak_gpu_bytes, missing=missing,
        ranks=all_gather_object(mine, process_group),
    )
    if verbose and rank == 0:
        print(report.summary_line(), flush=True)
    return report


def dcp_load(state_dict: dict, reader, planner, process_group) -> None:
    """``dcp.load`` that raises our own error on every rank instead of DCP's ``CheckpointException``
    (a ``BaseException`` that ``except Exception`` misses), and stays quiet about single-process use."""
    try:
        with warnings.catch_warnings():
            # DCP warns that it "assumes a single process" when no group exists: that is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=reader, planner=planner, process_group=process_group,
                     no_dist=not is_dist(process_group))
    except CheckpointException as e:
        raise_gathered({r: exc for r, (exc, _tb) in e.failures.items()})
        raise


def _device_of(state_dict: Mapping[str, Any]) -> torch.device | None:
    for v in state_dict.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _local(t: Any) -> torch.Tensor | None:
    if isinstance(t, DTensor):
        return t.to_local()
    return t if isinstance(t, torch.Tensor) else None


def _validate_destinations(
    state_dict: Mapping[str, Any], reader: StreamingFP8StorageReader, strict: bool
) -> list[str]:
    """Check every requested key before any I/O; return the keys missing from the checkpoint."""
    logical = reader.logical_tensors()
    missing = [k for k in state_dict if k not in logical]
    if missing and strict:
        hint = difflib.get_close_matches(missing[0], list(logical), n=3)
        raise DestinationError(
            f"{len(missing)} requested key(s) are not in the checkpoint (examples={missing[:3]})",
            file=str(reader.index.path), tensor=missing[0],
            expected=f"keys named as in the checkpoint{'; close matches: ' + str(hint) if hint else ''}",
            fix="map model names to checkpoint names (streaming_adapters.models key mappers), or pass "
            "strict=False to skip them",
        )
    for key, value in state_dict.items():
        if key not in logical:
            continue
        lt = logical[key]
        local = _local(value)
        if local is None:
            raise DestinationError(
                f"destination is a {type(value).__name__}, not a tensor", file=lt.stored.file, tensor=key,
                expected="a torch.Tensor or DTensor", fix="pass tensors (e.g. model.state_dict())",
            )
        if tuple(value.shape) != tuple(lt.shape):
            raise DestinationError(
                f"destination shape {list(value.shape)} differs from the checkpoint's {list(lt.shape)}",
                file=str(reader.index.file_path(lt.stored.file)), tensor=key,
                expected=f"global shape {list(lt.shape)} ({lt.stored.dtype} on disk)",
                fix="build the model from the checkpoint's config.json (a different size or vocab?)",
            )
        if lt.quantized and value.dtype not in FLOAT_DESTINATIONS:
            raise DestinationError(
                f"destination dtype {value.dtype} cannot hold a dequantized FP8 weight",
                file=str(reader.index.file_path(lt.stored.file)), tensor=key,
                expected="bfloat16, float16 or float32", fix="allocate the model in bfloat16",
            )
        if local.device.type == "meta":
            raise DestinationError(
                "destination is on the meta device", file=str(reader.index.path), tensor=key,
                expected="materialized storage (model.to_empty(device=...))",
                fix="call model.to_empty(device='cpu' or 'cuda') before loading",
            )
    return missing
