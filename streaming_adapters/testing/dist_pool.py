"""A pool of real torch.distributed ranks (gloo on CPU) that lives for a whole test module.

Starting torch in a process costs ~3 s on the CI machine; a module of 20 distributed cases would spend
a minute just importing.  The pool starts ``world_size`` processes once, initialises one process group,
and runs each test body on every rank::

    pool = ProcessGroupPool(2)
    results = pool.run(body, arg1, arg2)   # body(*args) on ranks 0..1; list of return values
    pool.close()

``body`` must be importable by name (a module-level function).  An exception on any rank is re-raised in
the caller with that rank's traceback; a rank that does not answer within ``timeout_s`` fails the call
and the pool is torn down (a hang is a test failure, not a stuck CI job).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, inq, outq, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from datetime import timedelta

    # A collective stuck on a failed peer errors out instead of hanging the pool.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    outq.put((rank, "ready", None))
    while True:
        job = inq.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            result = fn(*args, **kwargs)
            outq.put((rank, "ok", result))
        except BaseException as e:  # noqa: BLE001 -- report everything, CheckpointException included
            outq.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class RankError(AssertionError):
    pass


class ProcessGroupPool:
    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._in = [ctx.Queue() for _ in range(world_size)]
        self._out = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, backend, self._in[r], self._out, env or {}),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready")

    def _collect(self, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, str, str]] = {}
        waited = 0.0
        while len(results) + len(errors) < self.world_size:
            try:
                rank, status, payload = self._out.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results]
                if dead or waited >= self.timeout_s:
                    self.close(force=True)
                    raise RankError(
                        f"ranks did not answer {what!r} ({'dead: ' + str(dead) if dead else f'{waited:.0f} s'})"
                    ) from None
                continue
            if status == "error":
                errors[rank] = payload
            else:
                results[rank] = payload
        if errors:
            rank, (name, msg, tb) = sorted(errors.items())[0]
            raise RankError(f"{len(errors)} rank(s) failed; rank {rank}: {name}: {msg}\n{tb}")
        return [results[r] for r in range(self.world_size)]

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids in rank order (to sample their memory from outside, see ``rss.py``)."""
        return [p.pid for p in self._procs]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        for q in self._in:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "job"))

    def close(self, force: bool = False) -> None:
        for q, p in zip(self._in, self._procs):
            if p.is_alive() and not force:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.kill()
                p.join()
