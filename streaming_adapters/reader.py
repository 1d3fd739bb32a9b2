"""A torch DCP storage reader that dequantizes FP8 on read, straight into the destination shard.

Used with DCP's default planner:

* ``read_metadata`` shows FP8 weights as BF16 tensors of their global shape (one chunk at offset 0, as the
  stock ``HuggingFaceStorageReader`` does) and keeps scales / activation scales out of the metadata unless
  asked for (``include_hidden``);
* the planner turns every local shard of every DTensor into ``ReadItem`` boxes in global coordinates
  (uneven shards and FSDP-over-TP ``_StridedShard`` are resolved by DTensor before we see them);
* ``read_data`` hands every box to the read core (``streaming_adapters/read``: ``make_executor`` picks the
  CPU or CUDA executor per destination device), which reads the FP8 codes chunk by chunk, reads only the
  scale blocks each chunk touches, and dequantizes in global block coordinates into
  ``planner.resolve_tensor(item)`` -- a view of the rank's own shard storage.  CUDA destinations get the FP8
  bytes on the GPU and are dequantized there.

Memory model (per rank): no full-tensor or full-model temporary.  A box is processed in chunks of at most
``chunk_bytes`` of codes; on CPU with ``pread`` (the default) the codes are staged in one reusable buffer
of at most ``chunk_bytes``, with ``mmap`` they are page-cache views (no anonymous memory, but SIGBUS if a
shard shrinks mid-read); the dequantization scratch is one sub-chunk (~5 MiB).  CUDA destinations: the
pipeline's pinned and device rings (``read/cuda.py``).

DCP contract (what torch's own ``HuggingFaceStorageReader`` promises, kept here):

* ``reset(checkpoint_id)`` -- ``dcp.load(..., checkpoint_id=B)`` calls it -- re-opens the headers and the
  adapter of ``B`` (the reader was built for ``A``): the load reads ``B``'s bytes.
* A tensor saved in pieces by torch's distributed HF save (``DCP_SHARDING_INFO``) shows one chunk per piece
  at its offsets, like torch's reader, and DCP's planner intersects each destination shard with each
  piece: any world size and layout loads what any other saved, bit for bit.
* ``read_metadata().storage_data`` values are :class:`StreamingStorageInfo`, a subclass of torch's
  ``_HFStorageInfo`` (the piece's file, stored shape and dtype) carrying the tensor to fill from.
* Everything a user can get wrong in the checkpoint (headers, scale pairing, layouts) is checked when the
  reader is built or reset, i.e. before ``dcp.load`` enters its collective steps: our ``CheckpointError``
  reaches the caller of plain ``dcp.load`` as an ordinary exception, not wrapped in DCP's
  ``CheckpointException`` (a ``BaseException``).  Damage found only while reading tensor bytes (a scale
  that is not finite, a file truncated during the load) is raised inside DCP's read step, which wraps it;
  :func:`~streaming_adapters.load.load_fp8_state_dict` unwraps those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from .checkpoint.byteio import BoxReader
from .checkpoint.index import CheckpointIndex, ShardedTensorInfo
from .errors import CheckpointError
from .read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES, CudaExecutor, FillExecutor, make_executor
from .formats import LogicalTensor, StreamingFP8StateDictAdapter, get_adapter


@dataclass
class StreamingStorageInfo(_HFStorageInfo):
    """torch's per-entry storage info -- ``relative_path`` (the file, as torch's reader gives it: the full
    path), ``shape`` and ``dtype`` of the piece as stored -- plus the logical tensor this reader fills from
    (for a piece: the piece, with its own shape; for an FP8 weight: the weight with its scale grid)."""

    logical: LogicalTensor


# Older torch releases carried the tensor's byte offset and length in the file too (5 fields, same names).
_BYTE_RANGE_FIELDS = {"offset", "length"} <= {f.name for f in fields(_HFStorageInfo)}


def _storage_info(path: str, part: LogicalTensor) -> StreamingStorageInfo:
    kw = {"offset": part.stored.begin, "length": part.stored.nbytes} if _BYTE_RANGE_FIELDS else {}
    return StreamingStorageInfo(relative_path=path, shape=torch.Size(part.stored.shape),
                                dtype=part.stored.torch_dtype, logical=part, **kw)


class StreamingFP8StorageReader(HuggingFaceStorageReader):
    """DCP reader for FP8 (and plain) Hugging Face safetensors checkpoints.

    Args:
        path: checkpoint folder.
        index / adapter: already-opened headers and adapter (opened from ``path`` when omitted).
        chunk_bytes: the most FP8 code bytes processed at once, whatever the tensor size.
        io_backend: ``"pread"`` (default) or ``"mmap"`` (see ``checkpoint/byteio.py``; a shard truncated
            during a load under ``mmap`` can kill the process with SIGBUS).
        include_hidden: ``True`` to expose every scale / activation-scale key, or a set of names.
        gpu_pipeline: how :func:`~streaming_adapters.read.make_executor` fills CUDA destinations: the
            overlapped pipeline (``"auto"``); ``True`` forces it on CPU too (tests of its logic), ``False``
            runs it with one reader and one slot per ring (no overlap).
        readers: reader threads of the pipeline (reads in flight).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        index: CheckpointIndex | None = None,
        adapter: StreamingFP8StateDictAdapter | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        io_backend: str = DEFAULT_BACKEND,
        include_hidden: bool | set[str] = False,
        gpu_pipeline: bool | str = "auto",
        readers: int = 8,
    ) -> None:
        super().__init__(path=str(path))
        self._open(path, index, adapter)
        self.chunk_bytes = int(chunk_bytes)
        self.io_backend = io_backend
        self.include_hidden = include_hidden
        self.gpu_pipeline = gpu_pipeline
        self.readers = readers
        self.bytes_read = 0
        self.peak_transient_bytes = 0
        self.tensors_read = 0
        self.quantized_read = 0
        self.timings: dict[str, float] = {}

    def _open(self, path, index: CheckpointIndex | None, adapter: StreamingFP8StateDictAdapter | None) -> None:
        """Headers, adapter and its plan of ``path``, all validated now (outside DCP's wrapped steps)."""
        self._own_storage: dict[MetadataIndex, StreamingStorageInfo] | None = None
        self.index = index or CheckpointIndex.open(path, allow_pieces=True)
        self.adapter = adapter or get_adapter(path, index=self.index)
        if self.adapter.index is None:
            self.adapter.bind(self.index)
        for lt in self.adapter.plan.logical.values():
            stored = (lt.stored, lt.scale.tensor) if lt.scale is not None else ()
            sharded = [t for t in stored if isinstance(t, ShardedTensorInfo)]
            if sharded:
                raise CheckpointError(
                    "an FP8 weight or its scale is stored in DCP pieces across files: its blocks would be "
                    "dequantized against the wrong scales",
                    file=str(self.index.path), tensor=sharded[0].name,
                    expected="FP8 weights and their scales each whole in one file (DCP pieces are read for "
                    "unquantized tensors)",
                    fix="consolidate the checkpoint (HuggingFaceStorageWriter(enable_consolidation=True)) or "
                    "save the FP8 weights with save_distributed=False",
                )

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """``dcp.load(..., checkpoint_id=...)`` calls this: a new path means a new checkpoint, so its
        headers and adapter are opened (a reader built for checkpoint A then loads B, not A's bytes)."""
        super().reset(checkpoint_id)
        if checkpoint_id is not None and Path(checkpoint_id).resolve() != self.index.path:
            self._open(checkpoint_id, None, None)

    # -- metadata ------------------------------------------------------------------------------------
    def logical_tensors(self) -> dict[str, LogicalTensor]:
        plan = self.adapter.plan
        out = dict(plan.logical)
        for name, info in plan.hidden.items():
            if self.include_hidden is True or (isinstance(self.include_hidden, set) and name in self.include_hidden):
                out[name] = LogicalTensor(name, info.shape, info.torch_dtype, info, None)
        return out

    def read_metadata(self) -> Metadata:
        sd_md: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, StreamingStorageInfo] = {}
        for name, lt in self.logical_tensors().items():
            if isinstance(lt.stored, ShardedTensorInfo):  # plain tensors only (FP8 pieces refused in _open)
                parts = [(offs, LogicalTensor(name, p.shape, lt.dtype, p, None)) for offs, p in lt.stored.pieces]
            else:
                parts = [((0,) * len(lt.shape), lt)]
            chunks = []
            for offs, part in parts:
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(part.shape)))
                storage[MetadataIndex(fqn=name, offset=torch.Size(offs))] = _storage_info(
                    str(self.index.file_path(part.stored.file)), part)
            sd_md[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=lt.dtype), size=torch.Size(lt.shape), chunks=chunks,
            )
        md = Metadata(state_dict_metadata=sd_md, storage_data=storage)  # type: ignore[arg-type]
        md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    # -- data ----------------------------------------------------------------------------------------
    def _logical_of(self, index: MetadataIndex) -> LogicalTensor:
        info = self.storage_data.get(index)
        if isinstance(info, StreamingStorageInfo):
            return info.logical
        # storage_data set by hand with torch's plain _HFStorageInfo (torch's own tests do): the piece is
        # looked up in this reader's metadata by the same index.
        if self._own_storage is None:
            self._own_storage = self.read_metadata().storage_data
        return self._own_storage[index].logical

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Item offsets are relative to the stored piece (a whole tensor: the piece at offset 0).
        source = {it.storage_index: self._logical_of(it.storage_index) for it in plan.items}
        items = sorted(plan.items, key=lambda it: (source[it.storage_index].stored.file,
                                                   source[it.storage_index].stored.begin, tuple(it.storage_offsets)))
        with BoxReader(self.index.path, self.io_backend) as io:
            # One executor per destination device (make_executor chooses the back end), each filling all
            # of its boxes in one call: the CUDA pipeline overlaps them all.
            executors: dict[torch.device, FillExecutor] = {}
            jobs: dict[torch.device, list] = {}
            done = []
            for item in items:
                target = planner.resolve_tensor(item).detach()
                if target.device not in executors:
                    executors[target.device] = make_executor(io, target.device, chunk_bytes=self.chunk_bytes,
                                                             gpu_pipeline=self.gpu_pipeline, readers=self.readers)
                    jobs[target.device] = []
                jobs[target.device].append((source[item.storage_index], tuple(item.storage_offsets),
                                            tuple(item.lengths), target))
                done.append((item, target))
            for device, ex in executors.items():
                ex.fill(jobs[device])
                if isinstance(ex, CudaExecutor):
                    for k, v in ex.timings().items():
                        self.timings[k] = self.timings.get(k, 0) + v
                self.tensors_read += ex.tensors
                self.quantized_read += ex.quantized
                self.peak_transient_bytes = max(self.peak_transient_bytes, ex.peak_transient_bytes)
            for item, target in done:
                planner.commit_tensor(item, target)
            self.bytes_read += io.bytes_read
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
