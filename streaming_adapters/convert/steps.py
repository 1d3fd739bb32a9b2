"""One step of a conversion on one rank: read + dequantize its row pieces, all-reduce the NVFP4 amax, quantize
and ``pwrite`` the outputs (``_run_step``), and the output files' index at the end (``_finalize``).  The run
object (``convert/run.py``) calls these; ``convert/engine.py``'s docstring gives the memory model.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.byteio import BoxReader
from ..checkpoint.index import CheckpointIndex
from ..dist import is_dist, raise_on_all_ranks
from ..errors import CheckpointError
from ..numerics import nvfp4
from ..read import FillExecutor, iter_subboxes
from .plan import DEFAULT_STEP_BYTES, ConversionPlan, Piece, Step
from .staging import StagedOutput


class Role(Enum):
    """How an output tensor is produced (``OutputTensor.role``, formats/outputs/base.py)."""

    COPY = "copy"  # the stored bytes as they are
    DEQUANT = "dequant"  # BF16 of an FP8 weight
    PACKED = "packed"  # NVFP4: two FP4 values a byte
    BLOCK_SCALE = "block_scale"  # NVFP4: one FP8 scale per 16 values
    GLOBAL_SCALE = "global_scale"  # NVFP4: one FP32 scale per amax unit
    INPUT_SCALE = "input_scale"  # W4A4: the calibrated activation scale


def _role(out) -> Role:
    return Role(out.role)


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
        role = _role(outs[0])
        if role is Role.COPY or (role is Role.DEQUANT and (not filler.overlapped or over)):
            # Streamed: chunk by chunk, never holding the piece.
            for s, n in iter_subboxes(start, length, max_elems):
                if role is Role.COPY:
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
        (bf16_out if role is Role.DEQUANT else held).append((piece, buf))
    filler.fill(jobs)
    for piece, buf in bf16_out:
        _write_rows(staged, plan, plan.outputs[piece.tensor][0], piece.r0, buf)
    for piece, buf in held:
        u = unit_of[piece.tensor]
        amax[u] = torch.maximum(amax[u], nvfp4.tensor_amax(buf).float())  # BF16 amax: exact in fp32


def _quantize_step(plan, filler, staged, dev, amax, unit_of, held, blocked, budget) -> None:
    target = plan.output_target

    def quantize(piece: Piece, r0: int, buf: torch.Tensor) -> None:
        outs = {_role(o): o for o in plan.outputs[piece.tensor]}
        a = amax[unit_of[piece.tensor]].to(torch.bfloat16)
        gs = target.global_scale(a)
        packed, scale = target.quantize(buf, gs)
        _write_rows(staged, plan, outs[Role.PACKED], r0, packed)
        _write_rows(staged, plan, outs[Role.BLOCK_SCALE], r0, scale)
        if r0 == 0:
            gs_out = outs[Role.GLOBAL_SCALE]
            staged.pwrite(*plan.location(gs_out)[:2], _bytes(gs.to(torch.float32).reshape(gs_out.shape)))
            if Role.INPUT_SCALE in outs:  # W4A4: from the calibrated table (calibrate/scales.py)
                o = outs[Role.INPUT_SCALE]
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
