"""Plan NeMo ``CheckpointLoadPart`` s: model tensors -> groups (one decoder layer each) -> DCP destinations.

NeMo's ``Checkpointer._load_model_in_parts`` runs, per part, ``dcp.load(part.checkpoint_tensors)`` with its
own safetensors reader (stored bytes, copied as they are) and then ``part.finish()``.  So a part asks NeMo's
reader for exactly the boxes this rank needs, and finishing dequantizes them with our numerics:

* unquantized tensors: the destination *is* the view of the model's local shard (no temporary);
* FP8 weights: a temporary FP8 box per (tensor, box) on the host (1 byte per element of the rank's slice),
  plus the tensor's scale (whole grid: 1/16384 of the weight for 128x128 blocks); ``finish`` runs
  :class:`~streaming_adapters.fill.BoxFiller` over them -- the same code path as our own DCP reader, chunk
  by chunk into the destination view (Triton on CUDA, LUT on CPU), then drops the temporaries.

Boxes are arbitrary (TP / FSDP / EP shards, fused experts, views NeMo's MoE adapters return), so a
checkpoint tensor's destination is a :class:`BoxDestination`: a storage-less tensor of the checkpoint's global
shape that tells DCP which chunks this rank wants (``__create_chunk_list__``) and where each goes
(``__get_tensor_shard__``), the protocol DTensor implements.

Memory model (per rank): the model's own shards + one part's FP8 temporaries (its decoder layer's FP8 bytes
on this rank; temporaries are allocated when the part is handed to NeMo and released by ``finish``) + the
reader's chunk scratch (``chunk_bytes``).  The plan itself holds views and small tuples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from ...models.loadplan import REST, PartPlan, clusters, group_of, split_to

# Parts (one decoder layer each, by the family's ``layer_of``), their splitting and the ranks' agreement are
# the load plan's (``models/loadplan.py``), shared with ``load_fp8_checkpoint``; re-exported here.
__all__ = ["REST", "BoxDestination", "PartPlan", "TemporaryBoxes", "clusters", "group_of", "split_to"]


class BoxDestination(torch.Tensor):
    """A DCP load destination made of boxes of one checkpoint tensor (no storage of its own).

    ``boxes``: ``[(start, length, tensor)]`` with ``tensor.shape == length``; DCP asks for each box by its
    offset.  Any other use of this tensor is an error (it has no data)."""

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, boxes: list[tuple[tuple, tuple, torch.Tensor]]):
        t = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device="cpu")
        t._boxes = {tuple(start): tensor for start, _, tensor in boxes}
        t._chunks = [ChunkStorageMetadata(offsets=torch.Size(start), sizes=torch.Size(length))
                     for start, length, _ in boxes]
        return t

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return list(self._chunks)

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._boxes[tuple(index.offset)]

    def __repr__(self) -> str:
        return f"BoxDestination(shape={list(self.shape)}, dtype={self.dtype}, boxes={len(self._chunks)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"BoxDestination has no data: {func} is not supported (DCP fills its boxes)")


class TemporaryBoxes:
    """The byte source of :class:`~streaming_adapters.fill.BoxFiller` during ``finish``: boxes of FP8 codes and
    whole scale grids that NeMo's reader has just filled (``BoxReader.read`` interface)."""

    backend = "mmap"  # already host memory: BoxFiller must not stage it again

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.bytes_read = 0
        self.boxes: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        self.grids: dict[str, torch.Tensor] = {}

    def read(self, info, start=None, length=None, *, out=None) -> torch.Tensor:
        if info.name in self.grids:
            t = self.grids[info.name].reshape(info.shape)
            s0 = (0,) * t.ndim
        else:
            s0, t = next((s, b) for s, b in self.boxes[info.name]
                         if all(a >= o and a + n <= o + m for a, n, o, m in zip(start, length, s, b.shape)))
        for d, (a, n, o) in enumerate(zip(start or (), length or (), s0)):
            if a - o != 0 or n != t.shape[d]:
                t = t.narrow(d, a - o, n)
        return t
