"""NeMo ``CheckpointLoadPart`` destinations: a part names its checkpoint tensors without having NeMo read them.

NeMo's ``Checkpointer._load_model_in_parts`` runs, per part, ``dcp.load(part.checkpoint_tensors)`` with its
own safetensors reader (stored bytes, copied as they are) and then ``part.finish()``; it refuses a part with no
checkpoint tensors, a name absent from the checkpoint, or a name requested twice.  Each checkpoint tensor of a
part is therefore a :class:`BoxDestination` with no boxes: a storage-less tensor of the checkpoint's global
shape and stored dtype whose chunk list (``__create_chunk_list__``, the protocol DTensor implements) is empty,
so DCP's planner makes no read item of it and NeMo's reader reads nothing.  ``finish`` reads the part's boxes
through the read core straight into the model's shard views (``loader.py``).

Until 2026-12 the FP8 boxes went to whole-box host temporaries filled by NeMo's reader (:class:`TemporaryBoxes`,
deprecated, unused) and were then dequantized through the deprecated ``fill.BoxFiller``: one part's FP8 codes
on the host per rank (docs/nemo.md has the measured difference).
"""

from __future__ import annotations

import warnings
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
    offset; ``[]`` (what the loader passes) makes DCP read nothing of the tensor.  Any other use of this tensor
    is an error (it has no data)."""

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
    """Deprecated (unused since NeMo's parts read through the read core): a byte source (``BoxReader.read``
    interface) of host boxes of FP8 codes and whole scale grids, kept importable for code that built one."""

    backend = "mmap"  # already host memory: the CPU executor must not stage it again

    def __init__(self, root: str | Path) -> None:
        warnings.warn("streaming_adapters.integrations.nemo.parts.TemporaryBoxes is deprecated and unused: NeMo's "
                      "parts are read by streaming_adapters.read straight into the model's shards",
                      DeprecationWarning, stacklevel=2)
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
