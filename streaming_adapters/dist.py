"""Small torch.distributed helpers shared by loading and conversion."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .errors import CheckpointError, DistributedCheckpointError


def is_dist(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    if not is_dist(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    if not is_dist(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_on_all_ranks(error: BaseException | None, group: dist.ProcessGroup | None = None) -> None:
    """Collective: if any rank has an error, every rank raises.  The same error everywhere is raised as
    itself (its own class); different errors as one :class:`DistributedCheckpointError`."""
    errors = {r: e for r, e in enumerate(all_gather_object(error, group)) if e is not None}
    raise_gathered(errors)


def raise_gathered(errors: dict[int, BaseException]) -> None:
    if not errors:
        return
    first = next(iter(errors.values()))
    if isinstance(first, CheckpointError) and all(str(e) == str(first) for e in errors.values()):
        raise first
    raise DistributedCheckpointError(errors)


def run_then_gather(fn, group: dist.ProcessGroup | None = None):
    """Collective: ``fn()`` on every rank, then every rank raises if any rank's call failed (a failure that is
    not a :class:`CheckpointError` is named as one), so no rank waits at the next collective for a rank that
    is gone.  Returns ``fn()``'s result."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it
        error = e if isinstance(e, CheckpointError) else CheckpointError(
            f"{type(e).__name__}: {e}", fix="if the message does not point at the checkpoint, report it as a bug")
    raise_on_all_ranks(error, group)
    return result
