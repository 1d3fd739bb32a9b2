"""``convert_checkpoint``: FP8 -> BF16 or NVFP4, every rank of a group converting its share, step by step.

Per step, on each rank: read + dequantize its row pieces (BF16, on ``device``); for NVFP4, take the
max |W| of every amax unit over the rank's pieces, all-reduce MAX across ranks (with a slot that says
whether any rank failed), derive each unit's global scale, quantize, and ``pwrite`` the rows into the
preallocated output files.  Each step ends with one small all-reduce [any rank failed, any rank wants a
sync point]; at a sync point every rank fsyncs, errors are gathered (the barrier) and rank 0 marks the
steps done (the resume points).  An error on one rank is therefore raised by every rank at the next
collective, never a hang; on Ctrl-C / SIGTERM / any error every rank records the steps it finished.

Memory model (per rank): the BF16 of the rank's pieces of one step, at most ``step_bytes / world``;
a piece beyond that (a fused unit larger than a step, or a header claiming a huge tensor) is converted
in row blocks of that size, read twice (amax, then quantize).  Plus the NVFP4 outputs of one block and
the reader's chunk.  Copies (norms, embeddings) and BF16 outputs stream chunk by chunk and are never held.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.byteio import BoxReader
from ..checkpoint.index import CheckpointIndex
from ..checkpoint.coverage import check_coverage
from ..dist import all_gather_object, is_dist, raise_on_all_ranks, rank_and_world
from ..errors import CheckpointError
from ..read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES, FillExecutor, iter_subboxes, make_executor
from ..formats import get_adapter
from ..numerics import nvfp4

from ..report import MemoryMonitor, RankStats
from .plan import DEFAULT_STEP_BYTES, ConversionPlan, Piece, Step, make_plan, source_fingerprint
from .report import ConvertReport
from .staging import StagedOutput, kill_point, write_error


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    target: str,
    format: str | None = None,  # noqa: A002 -- the public name the API fixes
    process_group: dist.ProcessGroup | None = None,
    step_bytes: int = DEFAULT_STEP_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_backend: str = DEFAULT_BACKEND,
    ignore: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    restart: bool = False,
    device: str | torch.device = "cpu",
    sync_every_s: float = 30.0,
    gpu_pipeline: bool | str = "auto",
    readers: int = 8,
    progress: bool = True,
    verbose: bool = False,
    calibration=None,
) -> ConvertReport:
    """Convert an FP8 (or BF16) checkpoint into a BF16 or NVFP4 checkpoint at ``dst``.

    Called on every rank of ``process_group`` (or alone).  ``target``: ``"bf16"`` or ``"nvfp4"``;
    ``format`` (nvfp4): ``"compressed-tensors"`` (default) or ``"modelopt"``.  ``ignore``: modules kept out
    of NVFP4, as compressed-tensors writes them: exact module (or tensor) names and ``re:`` regexes
    (``re.match`` on the module name); fnmatch globs still work with a DeprecationWarning that shows the
    ``re:`` spelling (formats/ignore.py).  The output is byte-identical for any world
    size; a killed run resumes from its last finished step when called again with the same arguments.
    ``sync_every_s``: how often the written steps are fsynced and recorded as done (the resume points);
    0 = after every step.  Between sync points ranks run without barriers.
    ``calibration`` (nvfp4): W4A4 -- a ``streaming_adapters.calibrate.CalibrationConfig`` or just the
    calibration data's path; the activation scales are calibrated layer by layer first (docs/calibration.md),
    the weights written exactly as without it.
    """
    rank, world = rank_and_world(process_group)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst).absolute()
    error: BaseException | None = None
    plan = tokens = None
    from ..calibrate import run as calib

    cal = calib.as_config(calibration)
    try:
        index = CheckpointIndex.open(src)
        check_coverage(index)
        adapter = get_adapter(src, index=index)
        if cal is not None and target != "nvfp4":
            raise CheckpointError("calibration needs target='nvfp4'", expected="target='nvfp4' (W4A4)",
                                  fix="drop calibration, or convert to nvfp4")
        cal_id = None
        if cal is not None:  # every error in the data before any compute
            tokens = calib.read_tokens(src, cal)
            cal_id = {"tokens_sha256": tokens.sha256, "moe_all_experts": calib.moe_rule(cal, format),
                      "attention": calib.attention(format)}
        plan = make_plan(index, adapter, target, format, world, step_bytes=step_bytes, ignore=ignore,
                         calibration=cal_id)
        staged = StagedOutput(dst, plan, src=index.path)
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it (gathered below)
        error = _named(e, rank, src)
    raise_on_all_ranks(error, process_group)
    assert plan is not None

    error, done = None, set()
    if rank == 0:
        try:
            plan.source_fingerprint = source_fingerprint(index)  # rank 0 only: it reads every file's header
            staged.prepare(overwrite=overwrite, restart=restart)
            done = set(range(len(plan.steps))) if staged.committed else staged.done_steps()
        except Exception as e:  # noqa: BLE001
            error = _named(e, rank, dst)
            staged.release()
    raise_on_all_ranks(error, process_group)
    done, committed = all_gather_object((done, staged.committed), process_group)[0]  # rank 0 decided
    calibrated = None
    if tokens is not None and not committed:  # a committed output needs no input scales
        from ..convert.staging import BOOK

        calibrated = calib.calibration_table(plan, src, tokens, cal, staged.root / BOOK, process_group, dev,
                                             progress and rank == 0)

    io = BoxReader(index.path, io_backend)
    filler = make_executor(io, dev, chunk_bytes=chunk_bytes, gpu_pipeline=gpu_pipeline, readers=readers)
    bar = _progress(plan, rank == 0 and progress)
    # A piece's BF16 rows held at once: about a rank's share of a step.  Pieces beyond it (a unit larger
    # than a step, or a header claiming [32768, 32768]) go in row blocks of this size, read twice (amax,
    # then quantize), so memory follows step_bytes, never what a header claims.
    budget = max(step_bytes // world, 1 << 20)
    finished = set(done)  # steps whose bytes this rank has written (its interrupt record)
    with MemoryMonitor(dev if dev.type == "cuda" else None) as mem:
        todo = [s for s in plan.steps if s.index not in done]
        unsynced: list[int] = []
        last_sync = time.perf_counter()
        try:
            with _sigterm_as_interrupt():
                if todo:
                    _prefetch(plan, todo[0], rank, io)
                error = None
                for i, step in enumerate(todo):
                    if i + 1 < len(todo) and error is None:
                        # The disk reads the next step while this one is dequantized and quantized.
                        _prefetch(plan, todo[i + 1], rank, io)
                    error = _run_step(plan, step, rank, filler, staged, dev, process_group, error, budget)
                    if error is None:
                        finished.add(step.index)
                        unsynced.append(step.index)
                        kill_point("step-done")
                    # One small collective per step: any rank's error, and whether any rank wants to sync
                    # (sync points are time-based: every rank must take the same ones).
                    want_sync = i + 1 == len(todo) or time.perf_counter() - last_sync >= sync_every_s
                    failed, want_sync = _any_over_ranks([error is not None, want_sync], process_group)
                    if failed:
                        raise_on_all_ranks(error, process_group)
                    if want_sync:
                        try:
                            staged.sync()
                        except CheckpointError as e:
                            error = e
                        raise_on_all_ranks(error, process_group)  # also the barrier: every rank fsynced
                        if rank == 0:
                            kill_point("step-synced")
                            try:
                                staged.mark_done(unsynced)
                            except OSError as e:
                                error = write_error(e, staged.root, "recording finished steps")
                        unsynced, last_sync = [], time.perf_counter()
                    if bar is not None:
                        bar.update(1)
                raise_on_all_ranks(error, process_group)
        except BaseException as e:
            _record_and_reraise(e, staged, rank, world, finished, len(plan.steps))
        if bar is not None:
            bar.update(len(plan.steps) - len(todo))
        staged.close()
        io.close()
        if bar is not None:
            bar.close()
        error = None
        if rank == 0 and not committed:
            try:
                _finalize(plan, staged, index, overwrite)
            except Exception as e:  # noqa: BLE001
                error = _named(e, rank, dst)
        if rank == 0:
            staged.release()
        raise_on_all_ranks(error, process_group)
    seconds = time.perf_counter() - t0
    my_pieces = [p for s in plan.steps if s.index not in done for p in s.pieces.get(rank, [])]
    n_fp8 = sum(1 for p in my_pieces if plan.logical[p.tensor].scale is not None)
    mine = RankStats(
        rank=rank, tensors=len(my_pieces), quantized=n_fp8, plain=len(my_pieces) - n_fp8, bytes_read=io.bytes_read, seconds=seconds, peak_transient_bytes=filler.peak_transient_bytes,
        peak_host_bytes=mem.peak_host, host_bytes_at_start=mem.start_host,
        peak_gpu_bytes=mem.peak_gpu if dev.type == "cuda" else None,
        gpu_bytes_at_start=mem.start_gpu if dev.type == "cuda" else None,
    )
    mine.bytes_written = staged.bytes_written  # type: ignore[attr-defined]
    ranks = all_gather_object(mine, process_group)
    report = ConvertReport(
        checkpoint=str(index.path), adapter=adapter.name, world_size=world, rank=rank, io_backend=io_backend,
        chunk_bytes=chunk_bytes, tensors=mine.tensors, quantized=mine.quantized, plain=mine.plain, bytes_read=mine.bytes_read, seconds=seconds,
        peak_transient_bytes=mine.peak_transient_bytes, peak_host_bytes=mine.peak_host_bytes,
        peak_gpu_bytes=mine.peak_gpu_bytes, ranks=ranks, output=str(dst), target=plan.target,
        format=plan.format, steps=len(plan.steps), steps_resumed=len(done),
        bytes_written=sum(getattr(r, "bytes_written", 0) for r in ranks), output_bytes=plan.total_output_bytes,
        ignore=plan.ignore,
    )
    if calibrated is not None:
        report.calibration = {**calibrated.to_dict(), "input_amax": plan.input_amax}
    if verbose and rank == 0:
        print(report.summary_line(), flush=True)
    return report


RESTART_HINT = "restart=True (Python API) / output.restart=true (recipe)"


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a conversion, after the finished steps were recorded: the message says how
    to resume.  A KeyboardInterrupt, so code that handles Ctrl-C handles it."""


def _named(e: BaseException, rank: int, where: Path) -> CheckpointError:
    """Any failure as a CheckpointError, so that it can be gathered and raised on every rank."""
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, OSError):  # writes to the output are named by staging.py; this is the source or else
        return CheckpointError(f"I/O error ({os.strerror(e.errno or 0)})", file=str(e.filename or where),
                               expected="a readable checkpoint file",
                               fix="check the file and its filesystem, then re-run the same command (it resumes)")
    return CheckpointError(f"conversion failed on rank {rank}: {type(e).__name__}: {e}", file=str(where),
                           fix="if the message does not point at the checkpoint, report it as a bug")


def _any_over_ranks(flags: list[bool], group) -> list[bool]:
    if not is_dist(group):
        return flags
    dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


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


def _prefetch(plan: ConversionPlan, step: Step, rank: int, io: BoxReader) -> None:
    """Advisory only: a failure here (a shard that changed) is met, named and gathered by the step's read."""
    try:
        for p in step.pieces.get(rank, []):
            lt = plan.logical[p.tensor]
            if lt.shape:
                box = (p.r0,) + (0,) * (len(lt.shape) - 1), (p.r1 - p.r0, *lt.shape[1:])
                io.prefetch(lt.stored, *(lt.decoder.stored_box(*box) if lt.decoder is not None else box))
    except Exception:  # noqa: BLE001
        pass


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().reshape(-1).contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _write_rows(staged: StagedOutput, plan: ConversionPlan, out, r0: int, data: torch.Tensor) -> None:
    file, begin, _ = plan.location(out)
    staged.pwrite(file, begin + r0 * out.row_bytes, _bytes(data))


def _run_step(plan: ConversionPlan, step: Step, rank: int, filler: FillExecutor, staged: StagedOutput,
              dev: torch.device, group, failed: BaseException | None = None,
              budget: int = DEFAULT_STEP_BYTES) -> BaseException | None:
    """One step on this rank; returns its error (or ``failed``, when an earlier error skips the work) instead
    of raising, so every rank still meets the step's collective and all learn of it there."""
    units = step.nvfp4_units(plan)
    unit_of = {n: i for i, u in enumerate(units) for n in u}
    # One extra slot: 1.0 when this rank failed, so the amax all-reduce also tells every rank.
    amax = torch.zeros(len(units) + 1, dtype=torch.float32, device=dev)
    held: list[tuple[Piece, torch.Tensor]] = []
    blocked: list[Piece] = []
    error = failed
    if error is None:
        try:
            _read_step(plan, step, rank, filler, staged, dev, budget, amax, unit_of, held, blocked)
        except Exception as e:  # noqa: BLE001
            error = _named(e, rank, staged.root)
    if units and is_dist(group):
        amax[-1] = 1.0 if error is not None else 0.0
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        if amax[-1].item() > 0:
            raise_on_all_ranks(error, group)
    if error is not None:
        return error
    try:
        _quantize_step(plan, filler, staged, dev, amax, unit_of, held, blocked, budget)
    except Exception as e:  # noqa: BLE001
        return _named(e, rank, staged.root)
    return None


def _row_blocks(piece: Piece, row_bytes: int, budget: int):
    rows = max(1, budget // max(1, row_bytes))
    for a in range(piece.r0, piece.r1, rows):
        yield a, min(piece.r1, a + rows)


def _fill_rows(plan: ConversionPlan, filler: FillExecutor, dev, name: str, a: int, b: int) -> torch.Tensor:
    lt = plan.logical[name]
    buf = torch.empty((b - a, *lt.shape[1:]), dtype=torch.bfloat16, device=dev)
    filler.fill([(lt, (a,) + (0,) * (len(lt.shape) - 1), (b - a, *lt.shape[1:]), buf)])
    return buf


def _read_step(plan, step, rank, filler, staged, dev, budget, amax, unit_of, held, blocked) -> None:
    bf16_out: list[tuple[Piece, torch.Tensor]] = []
    jobs = []
    held_bytes = 0
    max_elems = max(1, filler.chunk_bytes // 2)
    for piece in step.pieces.get(rank, []):
        lt = plan.logical[piece.tensor]
        outs = plan.outputs[piece.tensor]
        start = (piece.r0,) + (0,) * (len(lt.shape) - 1)
        length = (piece.r1 - piece.r0,) + tuple(lt.shape[1:])
        if not lt.shape:  # 0-dim plain tensor
            staged.pwrite(*plan.location(outs[0])[:2], _bytes(filler.read_stored(lt)))
            continue
        nbytes = 2 * math.prod(length)
        over = held_bytes + nbytes > budget
        if outs[0].role == "copy" or (outs[0].role == "dequant" and (not filler.overlapped or over)):
            # Streamed: chunk by chunk, never holding the piece.
            for s, n in iter_subboxes(start, length, max_elems):
                if outs[0].role == "copy":
                    data = filler.read_stored(lt, s, n)
                else:
                    data = torch.empty(n, dtype=torch.bfloat16, device=dev)
                    filler.fill([(lt, s, n, data)])
                _write_rows(staged, plan, outs[0], s[0], data)
            continue
        if over:
            # Beyond this rank's share of a step: amax now, block by block; quantized in a second pass.
            row_bytes = nbytes // max(1, length[0])
            u = unit_of[piece.tensor]
            for a, b in _row_blocks(piece, row_bytes, budget):
                buf = _fill_rows(plan, filler, dev, piece.tensor, a, b)
                amax[u] = torch.maximum(amax[u], nvfp4.tensor_amax(buf).float())
                del buf
            blocked.append(piece)
            continue
        held_bytes += nbytes
        buf = torch.empty(length, dtype=torch.bfloat16, device=dev)
        if filler.overlapped:  # GPU: the whole step's reads go through one overlapped pipeline run
            jobs.append((lt, start, length, buf))
        else:
            filler.fill([(lt, start, length, buf)])
        (held if outs[0].role != "dequant" else bf16_out).append((piece, buf))
    filler.fill(jobs)
    for piece, buf in bf16_out:
        _write_rows(staged, plan, plan.outputs[piece.tensor][0], piece.r0, buf)
    for piece, buf in held:
        u = unit_of[piece.tensor]
        amax[u] = torch.maximum(amax[u], nvfp4.tensor_amax(buf).float())  # BF16 amax: exact in fp32


def _quantize_step(plan, filler, staged, dev, amax, unit_of, held, blocked, budget) -> None:
    target = plan.output_target
    def quantize(piece: Piece, r0: int, buf: torch.Tensor) -> None:
        outs = {o.role: o for o in plan.outputs[piece.tensor]}
        a = amax[unit_of[piece.tensor]].to(torch.bfloat16)
        gs = target.global_scale(a)
        packed, scale = target.quantize(buf, gs)
        _write_rows(staged, plan, outs["packed"], r0, packed)
        _write_rows(staged, plan, outs["block_scale"], r0, scale)
        if r0 == 0:
            gs_out = outs["global_scale"]
            staged.pwrite(*plan.location(gs_out)[:2], _bytes(gs.to(torch.float32).reshape(gs_out.shape)))
            if "input_scale" in outs:  # W4A4: from the calibrated table (calibrate/scales.py)
                o = outs["input_scale"]
                x = target.input_scale(plan.input_amax[piece.tensor[: -len(".weight")]])
                staged.pwrite(*plan.location(o)[:2], _bytes(x.reshape(o.shape)))

    while held:
        piece, buf = held.pop(0)
        quantize(piece, piece.r0, buf)
        del buf
    for piece in blocked:
        lt = plan.logical[piece.tensor]
        row_bytes = 2 * math.prod(lt.shape[1:])
        for a, b in _row_blocks(piece, row_bytes, budget):
            quantize(piece, a, _fill_rows(plan, filler, dev, piece.tensor, a, b))


def _finalize(plan: ConversionPlan, staged: StagedOutput, index: CheckpointIndex, overwrite: bool) -> None:
    weight_map = {name: f for name, f in sorted(plan.file_of.items())}
    index_json = {"metadata": {"total_size": sum(o.nbytes for outs in plan.outputs.values() for o in outs)},
                  "weight_map": weight_map}
    extra = plan.output_target.output_files(index.config, plan.ignore, plan.w4a4)
    staged.finalize(index_json, extra, index.path, overwrite)
