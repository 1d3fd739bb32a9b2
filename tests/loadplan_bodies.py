"""Bodies of tests/test_families.py's two-rank tests (run on real gloo ranks by ProcessGroupPool)."""

from __future__ import annotations

import torch.distributed as dist

from streaming_adapters.errors import CheckpointError
from streaming_adapters.models.loadplan import LoadPlan, PartPlan, agree_mapping, agree_parts


def _parts(n: int, keys_per_part: int) -> list[PartPlan]:
    """``n`` parts of ``keys_per_part`` model keys, each key its own checkpoint tensor (its own cluster)."""
    parts = []
    for i in range(n):
        keys = [f"model.layers.{i}.w{j}.weight" for j in range(keys_per_part)]
        parts.append(PartPlan(keys, {k: {k} for k in keys}, layer=("model.layers", i)))
    return parts


def agree_parts_body(counts: list[tuple[int, int]], pad: bool):
    """Rank r holds ``counts[r] = (parts, keys per part)``; returns the agreed parts' model keys, or the error."""
    n, k = counts[dist.get_rank()]
    try:
        return [p.model_keys for p in agree_parts(_parts(n, k), None, pad=pad, path="/ckpt")]
    except CheckpointError as e:
        return type(e).__name__, str(e)


def agree_mapping_body(error_rank: int | None, problem_rank: int | None):
    """One rank fails while planning (``error_rank``) or finds a mapping problem (``problem_rank``)."""
    rank = dist.get_rank()
    plan = LoadPlan(used={f"t{rank}"})
    if rank == problem_rank:
        plan.problems.append("shape: model.layers.0.mlp.up_proj.weight [3, 4] does not fit [4, 4]")
    error = CheckpointError("header of shard 2 is truncated", file="/ckpt/b.safetensors") if rank == error_rank else None
    try:
        return agree_mapping(error, plan, {"t0": None, "t1": None, "t2": None}, None, path="/ckpt", strict=True,
                             unexpected_is_error=False)
    except CheckpointError as e:
        return type(e).__name__, str(e)
