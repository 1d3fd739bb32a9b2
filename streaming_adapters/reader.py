"""A torch DCP storage reader that dequantizes FP8 on read, straight into the destination shard.

Used with DCP's default planner:

* ``read_metadata`` shows FP8 weights as BF16 tensors of their global shape (one chunk at offset 0, as the
  stock ``HuggingFaceStorageReader`` does) and keeps scales / activation scales out of the metadata unless
  asked for (``include_hidden``);
* the planner turns every local shard of every DTensor into ``ReadItem`` boxes in global coordinates
  (uneven shards and FSDP-over-TP ``_StridedShard`` are resolved by DTensor before we see them);
* ``read_data`` fills each box: read the FP8 codes of the box (or of one chunk of it), read only the scale
  blocks that chunk touches, dequantize in global block coordinates into ``planner.resolve_tensor(item)``
  -- a view of the rank's own shard storage.  CUDA destinations get the FP8 bytes on the GPU and are
  dequantized there.

Memory model (per rank): no full-tensor or full-model temporary.  A box is processed in chunks of at most
``chunk_bytes`` of codes; on CPU with the mmap backend the codes are page-cache views (no anonymous
memory) and the dequantization scratch is one sub-chunk (~5 MiB); with ``pread`` or a CUDA destination the
chunk's codes are staged once (1 byte/element) and the GPU scratch is bounded by the chunk.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
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
from .checkpoint.index import CheckpointIndex
from .fill import DEFAULT_CHUNK_BYTES, BoxFiller
from .pipeline import DEFAULT_PIPELINE_CHUNK, GpuPipeline, split_box
from .formats import LogicalTensor, StreamingFP8StateDictAdapter, get_adapter


class StreamingFP8StorageReader(HuggingFaceStorageReader):
    """DCP reader for FP8 (and plain) Hugging Face safetensors checkpoints.

    Args:
        path: checkpoint folder.
        index / adapter: already-opened headers and adapter (opened from ``path`` when omitted).
        chunk_bytes: the most FP8 code bytes processed at once, whatever the tensor size.
        io_backend: ``"mmap"`` or ``"pread"`` (see ``checkpoint/byteio.py``).
        include_hidden: ``True`` to expose every scale / activation-scale key, or a set of names.
        gpu_pipeline: CUDA destinations go through :class:`~streaming_adapters.pipeline.GpuPipeline`
            (``"auto"``); ``True`` forces it on CPU too (tests of its logic), ``False`` disables it.
        readers: reader threads of the pipeline (reads in flight).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        index: CheckpointIndex | None = None,
        adapter: StreamingFP8StateDictAdapter | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        io_backend: str = "mmap",
        include_hidden: bool | set[str] = False,
        gpu_pipeline: bool | str = "auto",
        readers: int = 8,
    ) -> None:
        super().__init__(path=str(path))
        self.index = index or CheckpointIndex.open(path)
        self.adapter = adapter or get_adapter(path, index=self.index)
        if self.adapter.index is None:
            self.adapter.bind(self.index)
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

    # -- metadata ------------------------------------------------------------------------------------
    def logical_tensors(self) -> dict[str, LogicalTensor]:
        plan = self.adapter.plan
        out = dict(plan.logical)
        for name, info in plan.hidden.items():
            if self.include_hidden is True or (isinstance(self.include_hidden, set) and name in self.include_hidden):
                out[name] = LogicalTensor(name, info.shape, info.torch_dtype, info, None)
        return out

    def read_metadata(self, *args, **kwargs) -> Metadata:
        sd_md: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, LogicalTensor] = {}
        for name, lt in self.logical_tensors().items():
            zeros = torch.Size([0] * len(lt.shape))
            sd_md[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=lt.dtype),
                size=torch.Size(lt.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(lt.shape))],
            )
            storage[MetadataIndex(fqn=name, offset=zeros)] = lt
        md = Metadata(state_dict_metadata=sd_md, storage_data=storage)  # type: ignore[arg-type]
        md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    # -- data ----------------------------------------------------------------------------------------
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        items = sorted(
            plan.items,
            key=lambda it: (self.storage_data[it.storage_index].stored.file,
                            self.storage_data[it.storage_index].stored.begin, tuple(it.storage_offsets)),
        )
        with BoxReader(self.index.path, self.io_backend) as io:
            filler = BoxFiller(io, self.chunk_bytes)
            pipe, chunks, done = None, [], []
            for item in items:
                lt: LogicalTensor = self.storage_data[item.storage_index]
                target = planner.resolve_tensor(item).detach()
                start, length = tuple(item.storage_offsets), tuple(item.lengths)
                if self.gpu_pipeline is True or (self.gpu_pipeline == "auto" and target.is_cuda):
                    filler.check(lt, length, target, start)
                    if pipe is None:
                        pipe = GpuPipeline(io, target.device, chunk_bytes=min(self.chunk_bytes, DEFAULT_PIPELINE_CHUNK),
                                           readers=self.readers)
                    chunks += split_box(lt, start, length, target, pipe.max_elems(lt.stored.itemsize))
                    done.append((item, target))
                else:
                    filler.fill(lt, start, length, target)
                    planner.commit_tensor(item, target)
            if pipe is not None:
                pipe.run(chunks)
                for k, v in pipe.timings().items():
                    self.timings[k] = self.timings.get(k, 0) + v
                for item, target in done:
                    planner.commit_tensor(item, target)
                self.peak_transient_bytes = max(self.peak_transient_bytes, pipe.peak_transient_bytes)
            self.bytes_read += io.bytes_read
            self.tensors_read += filler.tensors
            self.quantized_read += filler.quantized
            self.peak_transient_bytes = max(self.peak_transient_bytes, filler.peak_transient_bytes)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
