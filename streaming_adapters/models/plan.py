"""Plan a model load before any I/O: model tensors -> parts -> regions -> views of local shards.

For each model tensor (tied ones once) the family's key mapper gives its :class:`~.keymap.Part` s; each
part becomes a *region* of the tensor in global model coordinates.  The regions must tile the tensor
exactly once (no gap, no overlap) and name checkpoint tensors that exist and fit; then each region is
intersected with the rank's local shard and becomes one :class:`Request`: "box ``[start, start + length)``
of checkpoint tensor C -> this view of the local storage".  Nothing is allocated: a request's ``view`` is
a ``narrow`` of the shard (fused experts are filled in place, never stacked).

Memory: the plan holds views and small tuples, O(parts) Python objects (~2 per expert per MoE layer).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from ..read import FLOAT_DESTINATIONS
from .families import STACKED_EXPERTS, Family, get_family
from .keymap import KeyMapper, Part

# Deprecated: which model tensors stack the experts along dim 0 is the family's (``Family.stacks_experts``).
FUSED_EXPERTS = re.compile(STACKED_EXPERTS)


@dataclass
class Request:
    """Fill ``view`` (a view of a local shard) with box ``[start, start + length)`` of ``ckpt_key``."""

    model_key: str
    ckpt_key: str
    start: tuple[int, ...]
    length: tuple[int, ...]
    view: torch.Tensor


@dataclass
class Plan:
    """What this rank reads, and what the mapping found (before any I/O)."""

    requests: list[Request] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # model keys with no (or an incomplete) source
    details: list[str] = field(default_factory=list)      # "missing: key (tried ...)" lines, for errors
    problems: list[str] = field(default_factory=list)     # shape / coverage / duplicate / dtype: always errors
    used: set[str] = field(default_factory=set)           # checkpoint keys this rank's tensors map to
    tensors: int = 0                                      # model tensors planned (tied ones once)


class _Ckpt:
    def __init__(self, logical) -> None:
        self.logical = logical

    def __contains__(self, key: str) -> bool:
        return key in self.logical

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.logical[key].shape)


def local_geometry(t: torch.Tensor, key: str = "", expert_range: tuple[int, int] | None = None,
                   family: Family | None = None):
    """(local tensor, its global offset, global shape) for a DTensor or a plain tensor.

    ``expert_range=(first, num_experts)``: plain tensors that stack the experts (the family's
    ``stacks_experts``, default: every known layout) hold experts ``first ..`` of ``num_experts`` (expert
    parallelism without DTensors)."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if t.device_mesh.get_coordinate() is None:
            return t.to_local(), (0,) * t.ndim, tuple(t.shape)
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offset), tuple(t.shape)
    if expert_range is not None and t.ndim >= 1 and (family or get_family()).stacks_experts(key):
        first, total = expert_range
        return t, (first,) + (0,) * (t.ndim - 1), (total, *t.shape[1:])
    return t, (0,) * t.ndim, tuple(t.shape)


def region(part: Part, model_shape: tuple[int, ...], ckpt_shape: tuple[int, ...]):
    """The part's region in model coordinates, ``(start, length)`` over all model dims, or None if it
    does not fit inside the model tensor."""
    lead = len(part.index)
    if lead + len(ckpt_shape) != len(model_shape):
        return None
    off = part.offset or (0,) * len(ckpt_shape)
    start = tuple(part.index) + tuple(off)
    length = (1,) * lead + tuple(ckpt_shape)
    if any(s < 0 or s + n > m for s, n, m in zip(start, length, model_shape)):
        return None
    return start, length


def overlapping(regions: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, int] | None:
    """The first pair of boxes that share an element, or None.  Sweep along dim 0: each box is compared
    only with the boxes still open at its start (2 per expert for fused experts, not all 2E)."""
    order = sorted(range(len(regions)), key=lambda i: regions[i][0])
    active: list[int] = []
    for i in order:
        s, n = regions[i]
        active = [j for j in active if regions[j][0][0] + regions[j][1][0] > s[0]] if s else active
        for j in active:
            t, m = regions[j]
            if all(a < b + lb and b < a + la for a, la, b, lb in zip(s, n, t, m)):
                return j, i
        active.append(i)
    return None


def plan_requests(state_dict: dict, mapper: KeyMapper, logical: dict,
                  expert_range: tuple[int, int] | None = None, seen: set | None = None,
                  family: Family | None = None) -> Plan:
    """The rank's requests and the mapping's findings (see the module docstring).  ``seen``: the storages
    already planned (shared between calls that plan one model piece by piece); ``family``: the checkpoint's
    (which tensors stack experts)."""
    ckpt, plan = _Ckpt(logical), Plan()
    seen = set() if seen is None else seen
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        local, offset, shape = local_geometry(value, key, expert_range, family)
        parts = mapper.parts(key, shape, ckpt)
        if local.numel():
            # Tied: the same storage (and view of it) under another name is filled once; a checkpoint that
            # still has the alias's own copy (``lm_head.weight`` next to tied embeddings) is not "unexpected".
            same = (local.data_ptr(), tuple(local.shape), local.stride())
            if same in seen:
                plan.used.update(p.ckpt_key for p in parts or () if p.ckpt_key in ckpt)
                continue
            seen.add(same)
        plan.tensors += 1
        if any(o + n > m for o, n, m in zip(offset, local.shape, shape)):
            plan.problems.append(f"shard: {key} local {list(local.shape)} at offset {list(offset)} exceeds its "
                                 f"global shape {list(shape)} (expert_range={expert_range})")
            continue
        absent = [p.ckpt_key for p in parts or () if p.ckpt_key not in ckpt]
        if parts is None or absent:
            plan.missing.append(key)
            plan.details.append(f"missing: {key} (tried {mapper.candidates(key)[:3]})" if parts is None
                                else f"missing: {key} needs {absent[:3]} ({len(absent)} absent)")
            continue
        regions = []
        for part in parts:
            r = region(part, shape, ckpt.shape(part.ckpt_key))
            if r is None:
                plan.problems.append(f"shape: {part.ckpt_key} {list(ckpt.shape(part.ckpt_key))} does not fit "
                                     f"{key} {list(shape)} at index {part.index} offset {part.offset}")
                break
            if logical[part.ckpt_key].scale is not None and value.dtype not in FLOAT_DESTINATIONS:
                plan.problems.append(f"dtype: {key} is {value.dtype}, cannot hold dequantized {part.ckpt_key}")
                break
            regions.append(r)
        else:
            if _check_tiling(key, shape, parts, regions, plan.problems):
                plan.used.update(p.ckpt_key for p in parts)
                plan.requests += [q for p, r in zip(parts, regions) if (q := _intersect(key, p, r, local, offset))]
    return plan


def _check_tiling(key, shape, parts, regions, problems: list[str]) -> bool:
    pair = overlapping(regions)
    if pair is not None:
        a, b = (parts[i] for i in pair)
        problems.append(f"duplicate: {a.ckpt_key} and {b.ckpt_key} both fill elements of {key} "
                        f"(at {regions[pair[0]][0]} and {regions[pair[1]][0]})")
        return False
    covered = sum(math.prod(n) for _, n in regions)
    if covered != math.prod(shape):
        problems.append(f"coverage: {key} {list(shape)} gets {covered} of {math.prod(shape)} elements "
                        f"from {len(parts)} part(s)")
        return False
    return True


def _intersect(key: str, part: Part, reg, local: torch.Tensor, offset) -> Request | None:
    """The request for the part of ``reg`` inside the local shard ``local`` (at global ``offset``)."""
    (rs, rl), lead = reg, len(part.index)
    lo = [max(a, o) for a, o in zip(rs, offset)]
    hi = [min(a + n, o + m) for a, n, o, m in zip(rs, rl, offset, local.shape)]
    if any(h <= l for h, l in zip(hi, lo)):
        return None
    view = local
    for d in range(len(lo)):
        if lo[d] - offset[d] != 0 or hi[d] - lo[d] != view.shape[d]:
            view = view.narrow(d, lo[d] - offset[d], hi[d] - lo[d])
    for _ in range(lead):
        view = view.squeeze(0)
    start = tuple(l - s for l, s in zip(lo[lead:], rs[lead:]))
    length = tuple(h - l for h, l in zip(hi[lead:], lo[lead:]))
    return Request(key, part.ckpt_key, start, length, view)
