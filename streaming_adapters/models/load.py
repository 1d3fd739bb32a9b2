"""``load_fp8_checkpoint``: fill an already-built (and parallelized) model from an FP8 checkpoint.

1. **Map and check, before any I/O** (``plan.py``).  Every model tensor (tied ones once) gets its parts
   from the family's key mapper; the parts must tile the tensor exactly once and name tensors the
   checkpoint has with shapes that fit.  Missing, duplicated and unexpected keys are reported with
   examples, and every rank raises the same error (unexpected = checkpoint tensors no rank uses).
2. **Requests.**  Each part's region is intersected with the rank's local shard (DTensor geometry, any
   placements; plain expert ranges via ``expert_range``); the intersection becomes one DCP ``ReadItem``:
   a box of the checkpoint tensor -> a view of the local storage.  Fused experts are filled through views.
3. **Parts.**  One ``dcp.load`` per decoder layer (the family's ``layer_of``) plus one for the rest.  Ranks
   agree on the number of parts (one all-gather, ``loadplan.agree_parts``) and pad with empty loads, so
   pipeline stages holding 2 and 3 layers issue the same collectives and never hang.  Steps 1 and 3 are
   ``loadplan.py``'s, shared with NeMo's ``PartsLoad``.

Memory model (per rank): the model's own shards (allocated by the caller) + the reader's transient
(``chunk_bytes`` of codes at most: one reusable staging buffer with the default pread backend on CPU,
page-cache views with mmap) + one group's DCP plan (a few hundred bytes per read item).  No full tensor, layer or model is ever assembled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from ..checkpoint.index import CheckpointIndex
from ..dist import all_gather_object, rank_and_world
from ..errors import CheckpointError, DestinationError
from ..read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES
from ..formats import get_adapter
from ..load import dcp_load
from ..reader import StreamingFP8StorageReader
from ..report import LoadReport, MemoryMonitor, RankStats
from .families import get_family
from .keymap import KeyMapper
from . import loadplan
from .loadplan import PartPlan, agree_mapping, agree_parts, plan_load, state_dict_destinations
from .plan import Request, local_geometry


@dataclass
class ModelLoadReport(LoadReport):
    """:class:`LoadReport` plus what the model-level plan found.

    ``missing``: model keys left unfilled (``strict=False`` only); ``unexpected``: checkpoint tensors no
    rank loads; ``groups``: ``dcp.load`` calls made (the same on every rank); ``requests``: read requests
    of this rank (one per part that meets the local shard)."""

    unexpected: list[str] = field(default_factory=list)
    groups: int = 0
    requests: int = 0


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


def _process_group(device_mesh, process_group):
    """The group whose ranks all call the load: the mesh's (a 1-D mesh), or the world (an n-D mesh that
    spans it: TP x FSDP, PP x ...)."""
    if device_mesh is None or process_group is not None:
        return process_group
    if device_mesh.ndim == 1:
        return device_mesh.get_group()
    if dist.is_initialized() and device_mesh.size() != dist.get_world_size():
        raise ValueError(f"device_mesh {device_mesh} spans {device_mesh.size()} of {dist.get_world_size()} "
                         "ranks: pass process_group= (the ranks that call load_fp8_checkpoint together)")
    return None


def load_fp8_checkpoint(
    model: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    *,
    device_mesh=None,
    process_group: dist.ProcessGroup | None = None,
    key_mapper: KeyMapper | None = None,
    strict: bool = True,
    expert_range: tuple[int, int] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_backend: str = DEFAULT_BACKEND,
    verbose: bool = False,
) -> ModelLoadReport:
    """Fill ``model``'s parameters and buffers from an FP8 (or plain) HF checkpoint, shard by shard.

    Args:
        model: built, parallelized as you like (FSDP2, TP, PP stages, EP) and materialized
            (``to_empty``); every rank of the group calls this with its own part of the model.
            Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: initialize them yourself.
        checkpoint_path: the checkpoint folder.
        device_mesh: a 1-D mesh whose group loads together, or an n-D mesh spanning the world.
        process_group: the ranks that call this together (default: the mesh's, else the world).
        key_mapper: model names -> checkpoint regions; default: the family's (``config.json``
            ``model_type``, see ``families.py``).
        strict: model tensors without a source and checkpoint tensors no rank loads are errors (else
            listed in ``report.missing`` / ``report.unexpected``; missing tensors are left untouched).
        expert_range: ``(first, num_experts)`` when fused expert tensors (``*.experts.gate_up_proj``) are
            plain tensors holding experts ``first ..`` of ``num_experts`` (EP without DTensors).
        chunk_bytes / io_backend: the reader's (see ``load_fp8_state_dict``).
        verbose: print the summary line on rank 0.
    """
    process_group = _process_group(device_mesh, process_group)
    rank, world = rank_and_world(process_group)
    t0 = time.perf_counter()
    error: BaseException | None = None
    reader = index = adapter = None
    plan, path, logical = loadplan.LoadPlan(), str(checkpoint_path), {}
    try:
        index = CheckpointIndex.open(checkpoint_path)
        path = str(index.path)
        adapter = get_adapter(checkpoint_path, index=index)
        logical = adapter.plan.logical
        family = get_family(index.config)
        mapper = key_mapper or family.mapper()
        state_dict = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        meta = [k for k, v in state_dict.items() if local_geometry(v)[0].device.type == "meta"]
        if meta:
            raise DestinationError(f"{len(meta)} model tensor(s) are on the meta device (examples={meta[:3]})",
                                   file=str(index.path), tensor=meta[0], expected="materialized storage",
                                   fix="call model.to_empty(device=...) (after parallelizing) first")
        plan = plan_load(state_dict_destinations(state_dict), mapper, logical, family, expert_range)
        reader = StreamingFP8StorageReader(checkpoint_path, index=index, adapter=adapter, chunk_bytes=chunk_bytes,
                                           io_backend=io_backend)
    except CheckpointError as e:
        error = e
    # One collective: every rank learns every rank's error and findings and raises the same error (or none).
    unexpected = agree_mapping(error, plan, logical, process_group, path=path, strict=strict,
                               unexpected_is_error=strict)
    device = plan.requests[0].view.device if plan.requests else None
    with MemoryMonitor(device) as mem:
        n_steps = _load_parts([p for p in plan.parts if p.requests], reader, process_group, path)
    cuda = device is not None and device.type == "cuda"
    mine = RankStats(rank=rank, tensors=reader.tensors_read, quantized=reader.quantized_read,
                     plain=reader.tensors_read - reader.quantized_read, bytes_read=reader.bytes_read,
                     seconds=time.perf_counter() - t0, peak_transient_bytes=reader.peak_transient_bytes,
                     peak_host_bytes=mem.peak_host, host_bytes_at_start=mem.start_host,
                     peak_gpu_bytes=mem.peak_gpu if cuda else None, gpu_bytes_at_start=mem.start_gpu if cuda else None)
    report = ModelLoadReport(
        checkpoint=str(index.path), adapter=adapter.name, world_size=world, rank=rank, io_backend=io_backend,
        chunk_bytes=chunk_bytes, tensors=mine.tensors, quantized=mine.quantized, plain=mine.plain,
        bytes_read=mine.bytes_read, seconds=mine.seconds, peak_transient_bytes=mine.peak_transient_bytes,
        peak_host_bytes=mine.peak_host_bytes, peak_gpu_bytes=mine.peak_gpu_bytes, missing=plan.missing,
        unexpected=unexpected, ranks=all_gather_object(mine, process_group), groups=n_steps,
        requests=len(plan.requests),
    )
    if verbose and rank == 0:
        print(report.summary_line(), flush=True)
    return report


def _load_parts(parts: list[PartPlan], reader, process_group, path: str) -> int:
    """One ``dcp.load`` per part; every rank makes the same number of calls (padded with empty loads)."""
    parts = agree_parts(parts, process_group, pad=True, path=path)
    for part in parts:
        dcp_load({}, reader, PartsLoadPlanner(part.requests), process_group)
    return len(parts)
