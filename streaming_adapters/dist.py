"""Small torch.distributed helpers shared by loading and conversion."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
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


def raise_gathered(errors: dict[int, BaseException], world: int | None = None) -> None:
    """Raise the ranks' gathered ``errors`` (rank -> error), if any: the same :class:`CheckpointError` on every
    failed rank as itself, else one :class:`DistributedCheckpointError`.  With ``world``, "itself" only when all
    ``world`` ranks failed, so a failure of some ranks names them."""
    if not errors:
        return
    first = next(iter(errors.values()))
    if (isinstance(first, CheckpointError) and all(str(e) == str(first) for e in errors.values())
            and (world is None or len(errors) == world)):
        raise first
    raise DistributedCheckpointError(errors)


def named(e: BaseException) -> CheckpointError:
    """``e`` as a :class:`CheckpointError` the other ranks can be sent (its type and message), itself if it is one."""
    if isinstance(e, CheckpointError):
        return e
    return CheckpointError(f"{type(e).__name__}: {e}",
                           fix="if the message does not point at the checkpoint, report it as a bug")


def run_then_gather(fn, group: dist.ProcessGroup | None = None):
    """Collective: ``fn()`` on every rank, then every rank raises if any rank's call failed (a failure that is
    not a :class:`CheckpointError` is named as one), so no rank waits at the next collective for a rank that
    is gone.  Returns ``fn()``'s result."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it
        error = named(e)
    raise_on_all_ranks(error, group)
    return result


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, else the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_over_ranks(flags: list[bool], group: dist.ProcessGroup | None = None) -> list[bool]:
    """Collective: each flag OR-ed over the ranks (one all-reduce MAX of ``len(flags)`` int32)."""
    if not is_dist(group):
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def raise_if_any(error: BaseException | None, group: dist.ProcessGroup | None = None) -> None:
    """Collective: every rank raises if any rank has an error; when none has, it costs one 4-byte all-reduce
    (the errors themselves are gathered only after a failure).  Called after a stretch of per-rank work (a
    rank's rows, its spill files), before the next collective: without it the other ranks would go on into
    that collective and wait there for the failed rank until the process group's timeout (10 min NCCL,
    30 min gloo by default).  One process: ``error`` itself is raised."""
    if not is_dist(group):
        if error is not None:
            raise error
        return
    if not any_over_ranks([error is not None], group)[0]:
        return
    gathered = all_gather_object(named(error) if error is not None else None, group)
    errors = {r: e for r, e in enumerate(gathered) if e is not None}
    try:
        raise_gathered(errors, world=len(gathered))
    except CheckpointError as out:
        if error is not None:
            raise out from error  # the failed rank keeps its own traceback
        raise


@contextlib.contextmanager
def every_rank_raises(group: dist.ProcessGroup | None = None):
    """``with every_rank_raises(group): <per-rank work>`` -- :func:`raise_if_any` on the block's exception
    (collective at the end of the block; the block itself must not enter a collective after a point where
    one rank may have failed)."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it
        error = e
    raise_if_any(error, group)
