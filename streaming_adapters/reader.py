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

import math
import os
from pathlib import Path
from typing import Iterator

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
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from .checkpoint.byteio import BoxReader
from .checkpoint.index import CheckpointIndex
from .errors import DestinationError, ScaleLayoutError
from .formats import LogicalTensor, StreamingFP8StateDictAdapter, get_adapter
from .numerics.fp8 import block_window, decode_scales, dequantize_into

# 64 MiB of FP8 codes per chunk: large enough that per-chunk overhead (<1 ms) is noise at 1 GB/s, small
# enough to stay well inside the 64 MiB + chunk budget the memory bar allows.
DEFAULT_CHUNK_BYTES = 64 << 20
FLOAT_DESTINATIONS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class StreamingFP8StorageReader(HuggingFaceStorageReader):
    """DCP reader for FP8 (and plain) Hugging Face safetensors checkpoints.

    Args:
        path: checkpoint folder.
        index / adapter: already-opened headers and adapter (opened from ``path`` when omitted).
        chunk_bytes: the most FP8 code bytes processed at once, whatever the tensor size.
        io_backend: ``"mmap"`` or ``"pread"`` (see ``checkpoint/byteio.py``).
        include_hidden: ``True`` to expose every scale / activation-scale key, or a set of names.
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
    ) -> None:
        super().__init__(path=str(path))
        self.index = index or CheckpointIndex.open(path)
        self.adapter = adapter or get_adapter(path, index=self.index)
        if self.adapter.index is None:
            self.adapter.bind(self.index)
        if chunk_bytes < 1 << 16:
            raise ValueError(f"chunk_bytes={chunk_bytes} is below 64 KiB")
        self.chunk_bytes = int(chunk_bytes)
        self.io_backend = io_backend
        self.include_hidden = include_hidden
        self.bytes_read = 0
        self.peak_transient_bytes = 0
        self.tensors_read = 0
        self.quantized_read = 0

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
            for item in items:
                lt: LogicalTensor = self.storage_data[item.storage_index]
                target = planner.resolve_tensor(item).detach()
                self.fill_box(io, lt, tuple(item.storage_offsets), tuple(item.lengths), target)
                planner.commit_tensor(item, target)
            self.bytes_read += io.bytes_read
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def fill_box(
        self,
        io: BoxReader,
        lt: LogicalTensor,
        start: tuple[int, ...],
        length: tuple[int, ...],
        target: torch.Tensor,
    ) -> None:
        """Fill ``target`` (shape ``length``) with the box ``[start, start + length)`` of ``lt``."""
        if tuple(target.shape) != tuple(length):
            raise DestinationError(
                f"destination box {list(target.shape)} differs from the planned box {list(length)}",
                file=lt.stored.file, tensor=lt.name, expected=f"{list(length)}",
                fix="report this as a bug with the destination's placements",
            )
        self.tensors_read += 1
        if lt.scale is not None:
            if target.dtype not in FLOAT_DESTINATIONS:
                raise DestinationError(
                    f"destination dtype {target.dtype} cannot hold a dequantized FP8 weight",
                    file=lt.stored.file, tensor=lt.name, expected="bfloat16, float16 or float32",
                    fix="allocate the destination in bfloat16 (or float32)",
                )
            self.quantized_read += 1
        device = target.device
        elem = lt.stored.itemsize
        per_elem = elem + (8 if device.type != "cpu" and lt.scale is not None else 0)
        max_elems = max(1, self.chunk_bytes // per_elem)
        staging = None
        for sub_start, sub_len in iter_subboxes(start, length, max_elems):
            local = tuple(s - s0 for s, s0 in zip(sub_start, start))
            dst = _narrow(target, local, sub_len)
            if io.backend == "pread" and device.type == "cuda":
                nbytes = math.prod(sub_len) * elem
                if staging is None or staging.numel() < nbytes:
                    staging = torch.empty(min(max_elems, math.prod(length)) * elem, dtype=torch.uint8,
                                          pin_memory=True)
                src = io.read(lt.stored, sub_start, sub_len, out=staging)
            else:
                src = io.read(lt.stored, sub_start, sub_len)
            transient = 0 if (io.backend == "mmap" and device.type == "cpu") else src.nbytes
            if device.type != "cpu":
                src = src.to(device, non_blocking=staging is not None)
            if lt.scale is None:
                dst.copy_(src)
                self.peak_transient_bytes = max(self.peak_transient_bytes, transient)
                continue
            lo, hi = block_window(sub_start, sub_len, lt.scale.block)
            raw = io.read(lt.scale.tensor, lo, tuple(h - l for h, l in zip(hi, lo)))
            scale = decode_scales(raw, lt.scale.encoding)
            _check_finite(scale, lt, lo)
            scratch = dequantize_into(dst, src, scale.to(device), sub_start, lt.scale.block, lo)
            if staging is not None:
                torch.cuda.current_stream(device).synchronize()  # the staging buffer is reused next chunk
            self.peak_transient_bytes = max(self.peak_transient_bytes, transient + scratch + scale.nbytes)


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


def _narrow(t: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


def _check_finite(scale: torch.Tensor, lt: LogicalTensor, lo: tuple[int, ...]) -> None:
    finite = torch.isfinite(scale)
    if bool(finite.all()):
        return
    bad = tuple(int(i) for i in (~finite).nonzero()[0])
    block = tuple(b + l for b, l in zip(bad, lo))
    value = float(scale[bad])
    raise ScaleLayoutError(
        f"scale is {value} (not finite) at block {list(block)}: the weights of that block would be NaN/Inf",
        file=str(Path(lt.scale.tensor.file)), tensor=lt.scale.tensor.name,
        expected="finite scales", fix="the checkpoint is damaged; re-download or re-export it",
    )
