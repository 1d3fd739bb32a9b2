"""``load_fp8_checkpoint``: fill an already-built (and parallelized) model from an FP8 checkpoint.

1. **Map and check coverage, before any I/O.**  Every model tensor (tied ones once) gets its parts from
   the family's key mapper; the parts must tile the tensor exactly once and name tensors the checkpoint
   has with shapes that fit.  Missing, duplicated and unexpected keys are reported with examples (on every
   rank: unexpected = checkpoint tensors no rank uses).
2. **Requests.**  Each part's region is intersected with the rank's local shard (DTensor geometry, any
   placements); the intersection becomes one DCP ``ReadItem``: a box of the checkpoint tensor -> a view of
   the local storage.  Fused experts are filled through views; nothing is stacked or copied.
3. **Groups.**  One ``dcp.load`` per decoder layer (plus one for the rest): the reader's transient is
   bounded by its chunk anyway; groups keep DCP's plan small and give NeMo-style parts.  Ranks agree on
   the number of groups (all-reduce MAX) and pad with empty loads, so pipeline stages holding 2 and 3
   layers issue the same collectives and never hang.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.tensor import DTensor

from ..checkpoint.index import CheckpointIndex
from ..dist import all_gather_object, is_dist, raise_on_all_ranks, rank_and_world
from ..errors import CheckpointError, DestinationError
from ..fill import DEFAULT_CHUNK_BYTES, FLOAT_DESTINATIONS
from ..formats import get_adapter
from ..load import dcp_load
from ..reader import StreamingFP8StorageReader
from ..report import LoadReport, MemoryMonitor, RankStats
from .families import get_key_mapper
from .keymap import KeyMapper, Part

LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class Request:
    """Fill ``view`` (a view of a local shard) with box ``[start, start + length)`` of ``ckpt_key``."""

    model_key: str
    ckpt_key: str
    start: tuple[int, ...]
    length: tuple[int, ...]
    view: torch.Tensor


class _Ckpt:
    def __init__(self, logical) -> None:
        self.logical = logical

    def __contains__(self, key: str) -> bool:
        return key in self.logical

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.logical[key].shape)


def local_geometry(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, its global offset, global shape) for a DTensor or a plain tensor."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if t.device_mesh.get_coordinate() is None:
            return t.to_local(), (0,) * t.ndim, tuple(t.shape)
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offset), tuple(t.shape)
    return t, (0,) * t.ndim, tuple(t.shape)


def _region(part: Part, model_shape: tuple[int, ...], ckpt_shape: tuple[int, ...]):
    """The part's region in model coordinates: (start, length) over all model dims."""
    lead = len(part.index)
    if lead + len(ckpt_shape) != len(model_shape):
        return None
    off = part.offset or (0,) * len(ckpt_shape)
    start = tuple(part.index) + tuple(off)
    length = (1,) * lead + tuple(ckpt_shape)
    if any(s + n > m for s, n, m in zip(start, length, model_shape)):
        return None
    return start, length


def plan_requests(state_dict: dict, mapper: KeyMapper, logical: dict) -> tuple[list[Request], list[str], set[str]]:
    """Requests for this rank, the problems found, and the checkpoint keys used."""
    ckpt = _Ckpt(logical)
    requests: list[Request] = []
    problems: list[str] = []
    used: set[str] = set()
    seen: dict[int, str] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        local, offset, shape = local_geometry(value)
        ident = local.untyped_storage().data_ptr() + local.storage_offset() * local.element_size() \
            if local.numel() else id(value)
        if ident in seen and local.numel():
            continue  # tied: the same storage under another name is filled once
        seen[ident] = key
        parts = mapper.parts(key, shape, ckpt)
        if parts is None:
            problems.append(f"missing: {key} (tried {mapper.candidates(key)[:3]})")
            continue
        covered = 0
        for part in parts:
            if part.ckpt_key not in ckpt:
                problems.append(f"missing: {part.ckpt_key} (for {key})")
                continue
            region = _region(part, shape, ckpt.shape(part.ckpt_key))
            if region is None:
                problems.append(f"shape: {part.ckpt_key} {list(ckpt.shape(part.ckpt_key))} does not fit {key} "
                                f"{list(shape)} at index {part.index} offset {part.offset}")
                continue
            used.add(part.ckpt_key)
            covered += math.prod(region[1])
            req = _intersect(key, part, region, local, offset)
            if req is not None:
                requests.append(req)
            if logical[part.ckpt_key].scale is not None and value.dtype not in FLOAT_DESTINATIONS:
                problems.append(f"dtype: {key} is {value.dtype}, cannot hold dequantized {part.ckpt_key}")
        if covered != math.prod(shape) and not any(p.startswith(("missing", "shape")) and key in p for p in problems):
            problems.append(f"coverage: {key} {list(shape)} gets {covered} of {math.prod(shape)} elements")
    _check_disjoint(requests, problems)
    return requests, problems, used


def _intersect(key: str, part: Part, region, local: torch.Tensor, offset) -> Request | None:
    (rs, rl), lead = region, len(part.index)
    lo = [max(a, o) for a, o in zip(rs, offset)]
    hi = [min(a + n, o + m) for a, n, o, m in zip(rs, rl, offset, local.shape)]
    if any(h <= l for h, l in zip(hi, lo)):
        return None
    view = local
    for d in range(len(lo)):
        view = view.narrow(d, lo[d] - offset[d], hi[d] - lo[d])
    for _ in range(lead):
        view = view.squeeze(0)
    start = tuple(l - s for l, s in zip(lo[lead:], rs[lead:]))
    length = tuple(h - l for h, l in zip(hi[lead:], lo[lead:]))
    return Request(key, part.ckpt_key, start, length, view)


def _check_disjoint(requests: list[Request], problems: list[str]) -> None:
    by_storage: dict[int, list[tuple[int, int, str]]] = {}
    for r in requests:
        v = r.view
        if v.numel() == 0:
            continue
        lo = v.data_ptr()
        span = sum((s - 1) * st for s, st in zip(v.shape, v.stride())) * v.element_size() + v.element_size()
        by_storage.setdefault(v.untyped_storage().data_ptr(), []).append((lo, lo + span, r.ckpt_key))
    for spans in by_storage.values():
        spans.sort()
        for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
            if b0 < a1 and ka != kb:
                # Strided views may interleave without overlapping; only flag exact duplicates of a start.
                if a0 == b0:
                    problems.append(f"duplicate: {ka} and {kb} fill the same elements")


class PartsLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner whose read items come from :func:`plan_requests` and whose destinations are
    views of local shards (``resolve_tensor`` returns the view; ``commit_tensor`` has nothing to do)."""

    def __init__(self, requests: list[Request]) -> None:
        super().__init__()
        self.requests = requests
        self._views: dict[str, torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, r in enumerate(self.requests):
            fqn = f"{r.model_key}#part{i}"
            self._views[fqn] = r.view
            nd = len(r.length)
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn=fqn, offset=torch.Size([0] * nd)),
                dest_offsets=torch.Size([0] * nd),
                storage_index=MetadataIndex(fqn=r.ckpt_key, offset=torch.Size([0] * nd)),
                storage_offsets=torch.Size(r.start),
                lengths=torch.Size(r.length),
            ))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self._views[read_item.dest_index.fqn]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _group_of(key: str) -> int:
    m = LAYER.search(key)
    return int(m.group(1)) if m else -1


def load_fp8_checkpoint(
    model: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    *,
    device_mesh=None,
    process_group: dist.ProcessGroup | None = None,
    key_mapper: KeyMapper | None = None,
    strict: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_backend: str = "mmap",
    verbose: bool = False,
) -> LoadReport:
    """Fill ``model``'s parameters and buffers from an FP8 (or plain) HF checkpoint, shard by shard.

    ``model`` is built (``to_empty`` done) and parallelized as you like (FSDP2, TP, PP stages, EP); every
    rank of ``process_group`` (default: the world; ``device_mesh`` is accepted for symmetry with torchtitan
    and only its process group is used) calls this with its own part of the model.  ``key_mapper``
    defaults to the family's (``get_key_mapper(config.json)``).  ``strict``: missing model tensors and
    unused checkpoint tensors are errors (else listed in the report).
    """
    if device_mesh is not None and process_group is None:
        process_group = device_mesh.get_group() if device_mesh.ndim == 1 else None
    rank, world = rank_and_world(process_group)
    t0 = time.perf_counter()
    error: BaseException | None = None
    reader = index = adapter = None
    requests: list[Request] = []
    problems: list[str] = []
    used: set[str] = set()
    try:
        index = CheckpointIndex.open(checkpoint_path)
        adapter = get_adapter(checkpoint_path, index=index)
        mapper = key_mapper or get_key_mapper(index.config)
        state_dict = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        if any(local_geometry(v)[0].device.type == "meta" for v in state_dict.values()):
            raise DestinationError("the model has tensors on the meta device", file=str(index.path),
                                   expected="materialized storage", fix="call model.to_empty(device=...) first")
        requests, problems, used = plan_requests(state_dict, mapper, adapter.plan.logical)
        reader = StreamingFP8StorageReader(checkpoint_path, index=index, adapter=adapter, chunk_bytes=chunk_bytes,
                                           io_backend=io_backend)
    except CheckpointError as e:
        error = e
    raise_on_all_ranks(error, process_group)
    all_used = set().union(*all_gather_object(used, process_group))
    unexpected = sorted(set(adapter.plan.logical) - all_used)
    missing = [p for p in problems if p.startswith("missing")]
    hard = [p for p in problems if not p.startswith("missing")] + (missing if strict else [])
    if strict and unexpected:
        hard.append(f"unexpected: {len(unexpected)} checkpoint tensor(s) no rank loads (examples={unexpected[:3]})")
    error = None
    if hard:
        error = DestinationError(
            f"{len(hard)} problem(s) mapping the model to the checkpoint (examples={hard[:3]})",
            file=str(index.path), tensor=hard[0].split(": ", 1)[-1].split(" ")[0],
            expected="every model tensor filled exactly once from tensors the checkpoint has",
            fix="check the model family (config.json model_type) and its key mapper "
            "(streaming_adapters.models.register_key_mapper), or pass strict=False",
        )
    raise_on_all_ranks(error, process_group)

    groups: dict[int, list[Request]] = {}
    for r in requests:
        groups.setdefault(_group_of(r.model_key), []).append(r)
    order = sorted(groups)
    n_steps = len(order)
    if is_dist(process_group):
        t = torch.tensor([n_steps], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
        n_steps = int(t.item())
    device = requests[0].view.device if requests else None
    with MemoryMonitor(device) as mem:
        for step in range(n_steps):
            reqs = groups[order[step]] if step < len(order) else []
            dcp_load({}, reader, PartsLoadPlanner(reqs), process_group)
    seconds = time.perf_counter() - t0
    mine = RankStats(rank=rank, tensors=reader.tensors_read, quantized=reader.quantized_read,
                     plain=reader.tensors_read - reader.quantized_read, bytes_read=reader.bytes_read,
                     seconds=seconds, peak_transient_bytes=reader.peak_transient_bytes,
                     peak_host_bytes=mem.peak_host, host_bytes_at_start=mem.start_host,
                     peak_gpu_bytes=mem.peak_gpu if device is not None and device.type == "cuda" else None)
    report = LoadReport(
        checkpoint=str(index.path), adapter=adapter.name, world_size=world, rank=rank, io_backend=io_backend,
        chunk_bytes=chunk_bytes, tensors=mine.tensors, quantized=mine.quantized, plain=mine.plain,
        bytes_read=mine.bytes_read, seconds=seconds, peak_transient_bytes=mine.peak_transient_bytes,
        peak_host_bytes=mine.peak_host_bytes, peak_gpu_bytes=mine.peak_gpu_bytes,
        missing=missing + [f"unexpected: {k}" for k in unexpected], ranks=all_gather_object(mine, process_group),
    )
    report.groups = n_steps  # type: ignore[attr-defined]
    if verbose and rank == 0:
        print(report.summary_line(), flush=True)
    return report
