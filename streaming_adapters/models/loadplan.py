"""The load plan, written once: key mapping, coverage check, parts per decoder layer, agreement across ranks.

Used by :func:`~streaming_adapters.models.load.load_fp8_checkpoint` (one ``dcp.load`` per part) and by NeMo's
``PartsLoad`` (one ``CheckpointLoadPart`` per part); a layer streamer asks :meth:`LoadPlan.part_of` for the
requests of one decoder layer.

1. **Map** (:func:`plan_load`).  Destinations ``{model key: [(checkpoint-layout key, tensor)]}`` (a plain state
   dict is ``[(key, tensor)]``) go through the family's key mapper and :func:`~.plan.plan_requests`: boxes of
   checkpoint tensors -> views of local shards, and the findings (missing / shape / coverage / dtype).
2. **Parts.**  One per decoder layer (the family's ``layer_of``: vision and language layer 0 are different
   parts), the rest (embeddings, final norm, lm_head, projector) last; :func:`bound_parts` splits a part whose
   FP8 bytes exceed a bound (never splitting tensors that share a checkpoint tensor, see :func:`clusters`).
3. **Agree** (:func:`agree_mapping`, :func:`agree_parts`).  One collective each: every rank sends its error or
   findings and its number of parts; every rank raises the same named error (or none), and all issue the same
   number of loads (padding with empty parts, or splitting their largest parts), so pipeline stages holding 2
   and 3 layers never hang.

Memory: views and small tuples, O(parts) Python objects (~2 per expert per MoE layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..dist import all_gather_object, raise_gathered
from ..errors import DestinationError
from .families import Family
from .keymap import KeyMapper
from .plan import Plan, Request, plan_requests

# Parts that hold no decoder layer (embeddings, final norm, lm_head, projector) sort last.
REST = ("\x7f", -1)


def group_of(key: str, family: Family) -> tuple[str, int]:
    """The part a model key belongs to: its decoder layer ``(prefix, index)``, or :data:`REST`."""
    return family.layer_of(key) or REST


@dataclass
class PartPlan:
    """One load part: the model keys it completes, the checkpoint tensors each maps to (whether or not this
    rank holds a box of them), and this rank's requests (boxes -> views)."""

    model_keys: list[str]
    sources: dict[str, set[str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    layer: tuple[str, int] = REST

    @property
    def ckpt_keys(self) -> set[str]:
        return set().union(*self.sources.values()) if self.sources else set()

    def temporary_bytes(self, logical: dict) -> int:
        """FP8 code bytes of this rank's boxes (what a part read through host temporaries allocates)."""
        boxes = {(r.ckpt_key, r.start, r.length) for r in self.requests if logical[r.ckpt_key].quantized}
        return sum(math.prod(length) * logical[k].stored.itemsize for k, _, length in boxes)

    def subset(self, keys: set[str]) -> PartPlan:
        return PartPlan([k for k in self.model_keys if k in keys], {k: v for k, v in self.sources.items() if k in keys},
                        [r for r in self.requests if r.model_key in keys], self.layer)


@dataclass
class LoadPlan(Plan):
    """This rank's parts (their requests are ``requests``, in part order) and what the mapping found."""

    parts: list[PartPlan] = field(default_factory=list)

    def part_of(self, layer: int, prefix: str | None = None) -> PartPlan:
        """The part of decoder layer ``layer`` (of the layer list ``prefix``, if the model has several): what a
        layer streamer fills.  An empty part when this rank holds nothing of it."""
        got = [p for p in self.parts if p.layer[1] == layer and p.layer != REST and prefix in (None, p.layer[0])]
        if len({p.layer for p in got}) > 1:
            raise ValueError(f"layer {layer} exists in {sorted({p.layer[0] for p in got})}: pass prefix=")
        if not got:
            return PartPlan([], layer=(prefix or "", layer))
        out = PartPlan([], layer=got[0].layer)
        for p in got:  # a part split by bytes is several parts of one layer
            out.model_keys += p.model_keys
            out.sources.update(p.sources)
            out.requests += p.requests
        return out


def plan_load(destinations: dict[str, list[tuple[str, torch.Tensor]]], mapper: KeyMapper, logical: dict,
              family: Family, expert_range: tuple[int, int] | None = None) -> LoadPlan:
    """Map every destination (tied storage once), then group the model keys into parts by decoder layer."""
    plan, seen = LoadPlan(), set()
    groups: dict[tuple[str, int], PartPlan] = {}
    for key, items in destinations.items():
        layer = group_of(key, family)
        part = groups.setdefault(layer, PartPlan([], layer=layer))
        part.model_keys.append(key)
        part.sources[key] = set()
        for ckpt_key, dest in items:
            found = plan_requests({ckpt_key: dest}, mapper, logical, expert_range, seen=seen, family=family)
            if found.missing and key not in plan.missing[-1:]:
                plan.missing.append(key)
            plan.details += found.details
            plan.problems += found.problems
            plan.tensors += found.tensors
            for r in found.requests:
                r.model_key = key  # the model's own name: NeMo's parts list model keys
            part.requests += found.requests
            part.sources[key] |= found.used
            plan.used |= found.used
    plan.parts = [groups[g] for g in sorted(groups)]
    plan.requests = [r for p in plan.parts for r in p.requests]
    return plan


def state_dict_destinations(state_dict: dict) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """A plain state dict as destinations: each tensor under its own name."""
    return {k: [(k, v)] for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def agree_mapping(error: BaseException | None, plan: LoadPlan, logical: dict, group, *, path: str, strict: bool,
                  unexpected_is_error: bool) -> list[str]:
    """Collective (one all-gather): every rank raises the same error -- a rank's own (planning failed), or the
    gathered mapping problems -- or none.  Returns the checkpoint tensors no rank uses."""
    gathered = all_gather_object((error, plan.used, plan.problems, plan.details), group)
    raise_gathered({r: g[0] for r, g in enumerate(gathered) if g[0] is not None})
    unexpected = sorted(set(logical) - set().union(*(g[1] for g in gathered)))
    problems = list(dict.fromkeys(p for g in gathered for p in g[2]))
    details = list(dict.fromkeys(d for g in gathered for d in g[3]))
    hard = problems + (details if strict else [])
    tensor = hard[0].split(": ", 1)[-1].split(" ")[0] if hard else None  # "kind: <model key> ..."
    if unexpected_is_error and unexpected:
        hard.append(f"unexpected: {len(unexpected)} checkpoint tensor(s) no rank loads (examples={unexpected[:3]})")
        tensor = tensor or unexpected[0]
    if hard:
        raise DestinationError(
            f"{len(hard)} problem(s) mapping the model to the checkpoint (examples={hard[:3]})", file=path,
            tensor=tensor, expected="every model tensor filled exactly once from tensors the checkpoint has",
            fix="check the model family (config.json model_type) and its key mapper "
            "(streaming_adapters.models.register_key_mapper); with load_fp8_checkpoint, strict=False skips "
            "missing and unexpected keys")
    return unexpected


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
    """Split parts (the one with the most model keys first) until there are ``n``.  Raises ``ValueError`` when
    this rank's parts cannot be split that far (fewer independent tensors than ``n``)."""
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


def capacity(parts: list[PartPlan]) -> int:
    """The most parts :func:`split_to` can make of ``parts``: a split keeps whole clusters, so each part ends
    as at most its clusters (an empty part stays one)."""
    return sum(max(1, len(clusters(p))) for p in parts)


def bound_parts(parts: list[PartPlan], budget: int, logical: dict) -> list[PartPlan]:
    """Parts whose FP8 bytes on this rank exceed ``budget`` split in halves (by clusters) until they fit."""
    out = []
    for part in parts:
        if part.temporary_bytes(logical) <= budget or len(clusters(part)) < 2:
            out.append(part)
        else:
            out += bound_parts(split_to([part], 2), budget, logical)
    return out


def agree_parts(parts: list[PartPlan], group, *, pad: bool, path: str) -> list[PartPlan]:
    """Collective (one all-gather): every rank ends with the same number of parts, the largest any rank has.
    ``pad``: add empty parts (a ``dcp.load`` of nothing); else split the largest parts (NeMo wants no empty
    part).  A rank that cannot split that far makes every rank raise the same :class:`DestinationError`."""
    counts = all_gather_object((len(parts), math.inf if pad else capacity(parts)), group)
    n = max(c for c, _ in counts)
    short = {r: cap for r, (_, cap) in enumerate(counts) if cap < n}
    if short:
        r, cap = next(iter(short.items()))
        raise DestinationError(
            f"pipeline stages need {n} load parts each, rank {r} can make only {cap} (ranks {sorted(short)})",
            file=path, tensor=None, expected="stages with comparable numbers of tensors",
            fix="balance the pipeline stages (pipeline.layers_per_stage), or raise max_part_bytes so that no "
            "stage splits its layers into more parts (streaming_adapters.integrations.nemo.configure)")
    if pad:
        return parts + [PartPlan([]) for _ in range(n - len(parts))]
    return split_to(parts, n)
