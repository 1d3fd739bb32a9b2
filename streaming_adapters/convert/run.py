"""``Conversion``: the run object behind ``convert_checkpoint`` -- ``prepare()`` (index, adapter, plan,
staging, calibration, reader), ``run_steps()``, ``finalize()``, ``report()``; ``run()`` calls them in order.

Every rank of the group runs the same calls.  Every failure a rank can meet is gathered before the next
collective (``dist.raise_on_all_ranks``), so every rank raises the same named error instead of one rank
raising and the others hanging (or dying with gloo's "connection closed") at a collective it never reaches.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch.distributed as dist

from ..calibrate import run as calib
from ..checkpoint.byteio import BoxReader
from ..checkpoint.coverage import check_coverage
from ..checkpoint.index import CheckpointIndex
from ..dist import all_gather_object, any_over_ranks, raise_on_all_ranks, rank_and_world, run_then_gather
from ..errors import CheckpointError
from ..formats import get_adapter
from ..models.families import get_family
from ..read import make_executor
from ..report import MemoryMonitor, RankStats
from .options import ConvertOptions
from .plan import ConversionPlan, make_plan, source_fingerprint
from .report import ConvertReport
from .staging import BOOK, StagedOutput, kill_point, write_error
from .steps import _finalize, _named, _prefetch, _run_step

RESTART_HINT = "restart=True (Python API) / output.restart=true (recipe)"


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a conversion, after the finished steps were recorded: the message says how
    to resume.  A KeyboardInterrupt, so code that handles Ctrl-C handles it."""


class Conversion:
    """One conversion of ``src`` into ``dst`` on this rank of ``process_group`` (or alone)."""

    def __init__(self, src, dst, options: ConvertOptions, process_group: dist.ProcessGroup | None = None):
        self.t0 = time.perf_counter()
        self.src, self.dst = Path(src), Path(dst).absolute()
        self.options, self.group = options, process_group
        self.rank, self.world = rank_and_world(process_group)
        self.dev = options.device
        self.plan: ConversionPlan | None = None
        self.tokens = self.calibrated = self.mem = None
        self.done: set[int] = set()
        self.committed = False

    def run(self) -> ConvertReport:
        self.prepare()
        with MemoryMonitor(self.dev if self.dev.type == "cuda" else None) as self.mem:
            self.run_steps()
            self.finalize()
        return self.report()

    # -- prepare ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Plan and stage on every rank, then (rank 0) claim the output and find the finished steps, then
        calibrate (W4A4) and open the reader; each stage's errors gathered before the next collective."""
        self._gather(self._plan, self.src)
        self._gather(self._claim_output if self.rank == 0 else None, self.dst)
        self.done, self.committed = all_gather_object((self.done, self.staged.committed), self.group)[0]
        if self.tokens is not None and not self.committed:  # a committed output needs no input scales
            self.calibrated = calib.calibration_table(self.plan, self.src, self.tokens, self.options.calibration,
                                                      self.staged.root / BOOK, self.group, self.dev,
                                                      self.options.progress and self.rank == 0,
                                                      get_family(self.index.config))
        self._gather(self._open_reader, self.src)

    def _gather(self, fn, where: Path) -> None:
        """``fn()`` (on this rank, if any), then every rank raises if any rank's call failed."""
        error = None
        if fn is not None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- every rank must learn of it
                error = _named(e, self.rank, where)
        raise_on_all_ranks(error, self.group)

    def _plan(self) -> None:
        o = self.options
        self.index = CheckpointIndex.open(self.src)
        check_coverage(self.index)
        self.adapter = get_adapter(self.src, index=self.index)
        cal_id = None
        if o.calibration is not None:  # every error in the data before any compute
            self.tokens = calib.read_tokens(self.src, o.calibration)
            cal_id = {"tokens_sha256": self.tokens.sha256, "moe_all_experts": calib.moe_rule(o.calibration, o.format),
                      "attention": calib.attention(o.format, o.calibration)}
        self.plan = make_plan(self.index, self.adapter, o.target, o.format, self.world, step_bytes=o.step_bytes,
                              ignore=o.ignore, calibration=cal_id)
        self.staged = StagedOutput(self.dst, self.plan, src=self.index.path)

    def _claim_output(self) -> None:
        try:
            self.plan.source_fingerprint = source_fingerprint(self.index)  # rank 0 only: reads every header
            self.staged.prepare(overwrite=self.options.overwrite, restart=self.options.restart)
            self.done = set(range(len(self.plan.steps))) if self.staged.committed else self.staged.done_steps()
        except Exception:
            self.staged.release()
            raise

    def _open_reader(self) -> None:
        o = self.options
        self.io = BoxReader(self.index.path, o.io_backend)
        self.filler = make_executor(self.io, self.dev, chunk_bytes=o.chunk_bytes, gpu_pipeline=o.gpu_pipeline,
                                    readers=o.readers)
        self.bar = _progress(self.plan, self.rank == 0 and o.progress)

    # -- steps -----------------------------------------------------------------------------------------------

    def run_steps(self) -> None:
        """The steps not done yet.  Per step one small all-reduce [any rank failed, any rank wants a sync
        point]; at a sync point every rank fsyncs, errors are gathered (the barrier), rank 0 marks the steps
        done.  On any failure or signal every rank records the steps it finished, then re-raises."""
        plan, rank, group = self.plan, self.rank, self.group
        # A piece's BF16 rows held at once: about a rank's share of a step.  Pieces beyond it (a unit larger
        # than a step, or a header claiming [32768, 32768]) go in row blocks of this size, read twice (amax,
        # then quantize), so memory follows step_bytes, never what a header claims.
        budget = max(self.options.step_bytes // self.world, 1 << 20)
        finished = set(self.done)  # steps whose bytes this rank has written (its interrupt record)
        todo = [s for s in plan.steps if s.index not in self.done]
        self.unsynced: list[int] = []
        self.last_sync = time.perf_counter()
        try:
            with _sigterm_as_interrupt():
                if todo:
                    _prefetch(plan, todo[0], rank, self.io)
                error = None
                for i, step in enumerate(todo):
                    if i + 1 < len(todo) and error is None:
                        # The disk reads the next step while this one is dequantized and quantized.
                        _prefetch(plan, todo[i + 1], rank, self.io)
                    error = _run_step(plan, step, rank, self.filler, self.staged, self.dev, group, error, budget)
                    if error is None:
                        finished.add(step.index)
                        self.unsynced.append(step.index)
                        kill_point("step-done")
                    error = self._end_step(error, last=i + 1 == len(todo))
                raise_on_all_ranks(error, group)
        except BaseException as e:
            _record_and_reraise(e, self.staged, rank, self.world, finished, len(plan.steps))
        if self.bar is not None:
            self.bar.update(len(plan.steps) - len(todo))

    def _end_step(self, error: BaseException | None, last: bool) -> BaseException | None:
        """The step's collective (sync points are time-based: every rank must take the same ones), then the
        sync point if any rank wants one.  Returns an error to carry to the next collective."""
        want_sync = last or time.perf_counter() - self.last_sync >= self.options.sync_every_s
        failed, want_sync = any_over_ranks([error is not None, want_sync], self.group)
        if failed:
            raise_on_all_ranks(error, self.group)
        if want_sync:
            try:
                self.staged.sync()
            except CheckpointError as e:
                error = e
            raise_on_all_ranks(error, self.group)  # also the barrier: every rank fsynced
            if self.rank == 0:
                kill_point("step-synced")
                try:
                    self.staged.mark_done(self.unsynced)
                except OSError as e:  # carried: gathered at the next step's collective or after the loop
                    error = write_error(e, self.staged.root, "recording finished steps")
            self.unsynced, self.last_sync = [], time.perf_counter()
        if self.bar is not None:
            try:
                self.bar.update(1)
            except Exception as e:  # noqa: BLE001 -- rank 0 only: gathered at the next collective
                error = error or _named(e, self.rank, self.dst)
        return error

    # -- finalize / report -----------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Every rank closes its files (gathered: rank 0 must not commit an output a rank failed to close),
        then rank 0 writes the index and config and renames the output into place (gathered)."""
        def close():
            self.staged.close()
            self.io.close()
            if self.bar is not None:
                self.bar.close()

        try:
            self._gather(close, self.dst)
            commit = self.rank == 0 and not self.committed
            self._gather((lambda: _finalize(self.plan, self.staged, self.index, self.options.overwrite))
                         if commit else None, self.dst)
        finally:
            if self.rank == 0:
                self.staged.release()

    def report(self) -> ConvertReport:
        """This rank's numbers and every rank's (gathered), as ``ConvertReport``."""
        plan, o, done = self.plan, self.options, self.done
        seconds = time.perf_counter() - self.t0
        mine = run_then_gather(lambda: self._rank_stats(seconds), self.group)
        ranks = all_gather_object(mine, self.group)
        report = ConvertReport(
            checkpoint=str(self.index.path), adapter=self.adapter.name, world_size=self.world, rank=self.rank,
            io_backend=o.io_backend, chunk_bytes=o.chunk_bytes, tensors=mine.tensors, quantized=mine.quantized,
            plain=mine.plain, bytes_read=mine.bytes_read, seconds=seconds,
            peak_transient_bytes=mine.peak_transient_bytes, peak_host_bytes=mine.peak_host_bytes,
            peak_gpu_bytes=mine.peak_gpu_bytes, ranks=ranks, output=str(self.dst), target=plan.target,
            format=plan.format, steps=len(plan.steps), steps_resumed=len(done),
            bytes_written=sum(getattr(r, "bytes_written", 0) for r in ranks), output_bytes=plan.total_output_bytes,
            ignore=plan.ignore,
        )
        if self.calibrated is not None:
            report.calibration = {**self.calibrated.to_dict(), "input_amax": plan.input_amax}
        if o.verbose and self.rank == 0:
            print(report.summary_line(), flush=True)
        return report

    def _rank_stats(self, seconds: float) -> RankStats:
        plan, mem, cuda = self.plan, self.mem, self.dev.type == "cuda"
        my_pieces = [p for s in plan.steps if s.index not in self.done for p in s.pieces.get(self.rank, [])]
        n_fp8 = sum(1 for p in my_pieces if plan.logical[p.tensor].scale is not None)
        mine = RankStats(
            rank=self.rank, tensors=len(my_pieces), quantized=n_fp8, plain=len(my_pieces) - n_fp8,
            bytes_read=self.io.bytes_read, seconds=seconds, peak_transient_bytes=self.filler.peak_transient_bytes,
            peak_host_bytes=mem.peak_host, host_bytes_at_start=mem.start_host,
            peak_gpu_bytes=mem.peak_gpu if cuda else None, gpu_bytes_at_start=mem.start_gpu if cuda else None,
        )
        mine.bytes_written = self.staged.bytes_written  # type: ignore[attr-defined]
        return mine


class _sigterm_as_interrupt:
    """SIGTERM (a scheduler's or torchrun's stop) becomes a KeyboardInterrupt, so the finished steps are
    recorded the same way as on Ctrl-C; both are remembered in ``received``: a rank whose collective failed
    because a peer left on Ctrl-C is reported as interrupted too.  Only the main thread can set handlers;
    elsewhere a no-op."""

    received: str | None = None

    def __enter__(self):
        self.old = {}
        _sigterm_as_interrupt.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._raise)
            except ValueError:  # not the main thread
                pass
        return self

    @staticmethod
    def _raise(signum, frame):
        _sigterm_as_interrupt.received = "SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        raise KeyboardInterrupt(_sigterm_as_interrupt.received)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def _record_and_reraise(e: BaseException, staged: StagedOutput, rank: int, world: int, finished: set[int],
                        total: int) -> None:
    """Every rank, on any failure in the step loop: fsync what it wrote and record its finished steps (the
    resume point; no collective, other ranks may be gone), then re-raise.  Signals are ignored meanwhile
    (a second Ctrl-C must not cut the record short)."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:
            pass
    try:
        staged.record_interrupt(rank, world, finished)
        recorded = True
    except Exception:  # noqa: BLE001 -- a full or read-only disk: the original error says more
        recorded = False
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    staged.release()  # fds and the lock: a retry in this process must not find its own lock held
    if isinstance(e, KeyboardInterrupt) or _sigterm_as_interrupt.received:
        what = _sigterm_as_interrupt.received or "interrupted (Ctrl-C)"
        raise ConversionInterrupted(
            f"{what}: {len(finished)} of {total} steps are finished on rank {rank}"
            f"{'' if recorded else ' (could not record them)'}; run the same command again to resume from "
            f"there, or pass {RESTART_HINT} to start over") from None
    raise e


def _progress(plan: ConversionPlan, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(plan.steps), desc=f"convert -> {plan.target}{'/' + plan.format if plan.format else ''}",
                unit="step", dynamic_ncols=True)

