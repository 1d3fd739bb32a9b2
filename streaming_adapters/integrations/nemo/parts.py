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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from ...formats import LogicalTensor
from ...models.plan import Request

# A decoder layer: ``model.layers.3.``, ``model.language_model.layers.0.``, ``layers.3.`` (pipeline stages keep
# global indices).  Everything else (embeddings, final norm, lm_head, projector) is one group, loaded last.
LAYER = re.compile(r"^(.*?layers)\.(\d+)\.")
REST = ("\x7f", -1)


def group_of(key: str) -> tuple[str, int]:
    m = LAYER.match(key)
    return (m.group(1), int(m.group(2))) if m else REST


@dataclass
class PartPlan:
    """One load part: the model keys it completes, the checkpoint tensors each maps to (whether or not this
    rank holds a box of them), and this rank's requests (boxes -> views)."""

    model_keys: list[str]
    sources: dict[str, set[str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    @property
    def ckpt_keys(self) -> set[str]:
        return set().union(*self.sources.values()) if self.sources else set()

    def temporary_bytes(self, logical: dict[str, LogicalTensor]) -> int:
        """FP8 code bytes this part allocates on this rank (scales are counted at allocation)."""
        boxes = {(r.ckpt_key, r.start, r.length) for r in self.requests if logical[r.ckpt_key].quantized}
        return sum(math.prod(length) * logical[k].stored.itemsize for k, _, length in boxes)

    def subset(self, keys: set[str]) -> PartPlan:
        return PartPlan([k for k in self.model_keys if k in keys], {k: v for k, v in self.sources.items() if k in keys},
                        [r for r in self.requests if r.model_key in keys])


def clusters(part: PartPlan) -> list[list[str]]:
    """Model keys that share a checkpoint tensor (a tied ``lm_head`` and the embeddings) stay together: NeMo
    refuses a checkpoint tensor requested by two parts.  Keys without any source (``_extra_state``) join the
    first cluster, so every cluster requests at least one tensor."""
    parent = {k: k for k in part.model_keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first: dict[str, str] = {}
    for key in part.model_keys:
        for c in sorted(part.sources.get(key, ())):
            if c in first:
                parent[find(key)] = find(first[c])
            else:
                first[c] = key
    groups: dict[str, list[str]] = {}
    for key in part.model_keys:
        groups.setdefault(find(key), []).append(key)
    with_src = [g for g in groups.values() if any(part.sources.get(k) for k in g)]
    without = [k for g in groups.values() if not any(part.sources.get(k) for k in g) for k in g]
    if with_src:
        with_src[0] = with_src[0] + without
        return with_src
    return [without] if without else []


def split_to(parts: list[PartPlan], n: int) -> list[PartPlan]:
    """Split parts (the one with the most model keys first) until there are ``n``: pipeline stages must make
    the same number of ``dcp.load`` calls.  Raises ``ValueError`` when this rank's parts cannot be split that
    far (fewer independent tensors than ``n``)."""
    parts = list(parts)
    while len(parts) < n:
        splittable = [(len(p.model_keys), i, cs) for i, p in enumerate(parts) if len(cs := clusters(p)) >= 2]
        if not splittable:
            raise ValueError(f"cannot make {n} load parts from {sum(len(p.model_keys) for p in parts)} model tensors")
        _, i, cs = max(splittable, key=lambda t: t[0])
        half = len(cs) // 2
        first = {k for c in cs[:half] for k in c}
        rest = {k for c in cs[half:] for k in c}
        parts[i:i + 1] = [parts[i].subset(first), parts[i].subset(rest)]
    return parts


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
