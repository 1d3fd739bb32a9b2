"""``convert_checkpoint``: FP8 -> BF16 or NVFP4, every rank of a group converting its share, step by step.

Per step, on each rank: read + dequantize its row pieces (BF16, on ``device``); for NVFP4, take the
max |W| of every amax unit over the rank's pieces, all-reduce MAX across ranks (one collective per step),
derive each unit's global scale, quantize, and ``pwrite`` the rows into the preallocated output files.
Then fsync, barrier, and rank 0 marks the step done (the resume point).

Memory model (per rank): the BF16 of the rank's pieces of one step (about ``step_bytes / world``; a
fused unit is never split across steps, so at least one unit's share), plus the NVFP4 outputs of one
piece and the reader's chunk.  Copies (norms, embeddings) and BF16 outputs stream chunk by chunk and
are never held.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.byteio import BoxReader
from ..checkpoint.index import CheckpointIndex
from ..dist import all_gather_object, is_dist, raise_on_all_ranks, rank_and_world
from ..errors import CheckpointError
from ..fill import DEFAULT_CHUNK_BYTES, BoxFiller, iter_subboxes
from ..pipeline import DEFAULT_PIPELINE_CHUNK, GpuPipeline, split_box
from ..formats import get_adapter

from ..report import MemoryMonitor, RankStats
from .plan import DEFAULT_STEP_BYTES, ConversionPlan, Piece, Step, make_plan
from .report import ConvertReport
from .staging import StagedOutput
from .targets import modelopt_hf_quant_config, output_config


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    target: str,
    format: str | None = None,  # noqa: A002 -- the public name the API fixes
    process_group: dist.ProcessGroup | None = None,
    step_bytes: int = DEFAULT_STEP_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_backend: str = "mmap",
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
    ``format`` (nvfp4): ``"compressed-tensors"`` (default) or ``"modelopt"``.  ``ignore``: module names
    or patterns (fnmatch, or ``re:`` regex) kept out of NVFP4.  The output is byte-identical for any world
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
    except (CheckpointError, ValueError) as e:
        error = e if isinstance(e, CheckpointError) else CheckpointError(str(e), fix="check the arguments")
    raise_on_all_ranks(error, process_group)
    assert plan is not None
    staged = StagedOutput(dst, plan)

    error, done = None, set()
    if rank == 0:
        try:
            staged.prepare(overwrite=overwrite, restart=restart)
            done = staged.done_steps()
        except CheckpointError as e:
            error = e
    raise_on_all_ranks(error, process_group)
    done = all_gather_object(done, process_group)[0]
    calibrated = None
    if tokens is not None:
        from ..convert.staging import BOOK

        calibrated = calib.calibration_table(plan, src, tokens, cal, staged.root / BOOK, process_group, dev,
                                             progress and rank == 0)

    io = BoxReader(index.path, io_backend)
    filler = BoxFiller(io, chunk_bytes)
    pipe = None
    if gpu_pipeline is True or (gpu_pipeline == "auto" and dev.type == "cuda"):
        pipe = GpuPipeline(io, dev, chunk_bytes=min(chunk_bytes, DEFAULT_PIPELINE_CHUNK), readers=readers)
    bar = _progress(plan, rank == 0 and progress)
    with MemoryMonitor(dev if dev.type == "cuda" else None) as mem:
        todo = [s for s in plan.steps if s.index not in done]
        unsynced: list[int] = []
        last_sync = time.perf_counter()
        if todo:
            _prefetch(plan, todo[0], rank, io)
        for i, step in enumerate(todo):
            if i + 1 < len(todo):
                # The disk reads the next step while this one is dequantized and quantized.
                _prefetch(plan, todo[i + 1], rank, io)
            _run_step(plan, step, rank, filler, staged, dev, process_group, pipe)
            unsynced.append(step.index)
            if i + 1 == len(todo) or time.perf_counter() - last_sync >= sync_every_s:
                staged.sync()
                _barrier(process_group)
                if rank == 0:
                    staged.mark_done(unsynced)
                unsynced, last_sync = [], time.perf_counter()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.update(len(plan.steps) - len(todo))
        staged.close()
        io.close()
        if bar is not None:
            bar.close()
        _barrier(process_group)
        error = None
        if rank == 0:
            try:
                _finalize(plan, staged, index, overwrite)
            except (CheckpointError, OSError) as e:
                error = e if isinstance(e, CheckpointError) else CheckpointError(
                    f"could not finish the output: {e}", file=str(dst), fix="check free space and permissions")
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


def _barrier(group) -> None:
    if is_dist(group):
        dist.barrier(group=group)


def _progress(plan: ConversionPlan, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(plan.steps), desc=f"convert -> {plan.target}{'/' + plan.format if plan.format else ''}",
                unit="step", dynamic_ncols=True)


def _prefetch(plan: ConversionPlan, step: Step, rank: int, io: BoxReader) -> None:
    for p in step.pieces.get(rank, []):
        lt = plan.logical[p.tensor]
        if lt.shape:
            box = (p.r0,) + (0,) * (len(lt.shape) - 1), (p.r1 - p.r0, *lt.shape[1:])
            io.prefetch(lt.stored, *(lt.decoder.stored_box(*box) if lt.decoder is not None else box))


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().reshape(-1).contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _write_rows(staged: StagedOutput, plan: ConversionPlan, out, r0: int, data: torch.Tensor) -> None:
    file, begin, _ = plan.location(out)
    staged.pwrite(file, begin + r0 * out.row_bytes, _bytes(data))


def _run_step(plan: ConversionPlan, step: Step, rank: int, filler: BoxFiller, staged: StagedOutput,
              dev: torch.device, group, pipe: GpuPipeline | None = None) -> None:
    units = step.nvfp4_units(plan)
    unit_of = {n: i for i, u in enumerate(units) for n in u}
    amax = torch.zeros(len(units), dtype=torch.float32, device=dev)
    held: list[tuple[Piece, torch.Tensor]] = []
    bf16_out: list[tuple[Piece, torch.Tensor]] = []
    chunks = []
    max_elems = max(1, filler.chunk_bytes // 2)
    for piece in step.pieces.get(rank, []):
        lt = plan.logical[piece.tensor]
        outs = plan.outputs[piece.tensor]
        start = (piece.r0,) + (0,) * (len(lt.shape) - 1)
        length = (piece.r1 - piece.r0,) + tuple(lt.shape[1:])
        if not lt.shape:  # 0-dim plain tensor
            staged.pwrite(*plan.location(outs[0])[:2], _bytes(filler.io.read(lt.stored)))
            continue
        if outs[0].role == "copy" or (outs[0].role == "dequant" and pipe is None):
            # Streamed: chunk by chunk, never holding the piece.
            for s, n in iter_subboxes(start, length, max_elems):
                if outs[0].role == "copy":
                    data = filler.io.read(lt.stored, s, n)
                else:
                    data = torch.empty(n, dtype=torch.bfloat16, device=dev)
                    filler.fill(lt, s, n, data)
                _write_rows(staged, plan, outs[0], s[0], data)
            continue
        buf = torch.empty(length, dtype=torch.bfloat16, device=dev)
        if pipe is not None:  # GPU: the whole step's reads go through one overlapped pipeline run
            filler.check(lt, length, buf, start)
            chunks += split_box(lt, start, length, buf, pipe.max_elems(lt.stored.itemsize))
        else:
            filler.fill(lt, start, length, buf)
        (held if outs[0].role != "dequant" else bf16_out).append((piece, buf))
    if pipe is not None:
        pipe.run(chunks)
    for piece, buf in bf16_out:
        _write_rows(staged, plan, plan.outputs[piece.tensor][0], piece.r0, buf)
    if held:
        from ..numerics import nvfp4
    for piece, buf in held:
        u = unit_of[piece.tensor]
        amax[u] = torch.maximum(amax[u], nvfp4.tensor_amax(buf).float())  # BF16 amax: exact in fp32
    if units and is_dist(group):
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    for piece, buf in held:
        outs = {o.role: o for o in plan.outputs[piece.tensor]}
        a = amax[unit_of[piece.tensor]].to(torch.bfloat16)
        if plan.format == "compressed-tensors":
            gs = nvfp4.ct_global_scale(a)
            packed, scale = nvfp4.quantize_ct(buf, gs)
        else:
            gs = nvfp4.modelopt_scale_2(a)
            packed, scale = nvfp4.quantize_modelopt(buf, gs)
        _write_rows(staged, plan, outs["packed"], piece.r0, packed)
        _write_rows(staged, plan, outs["block_scale"], piece.r0, scale)
        if piece.r0 == 0:
            gs_out = outs["global_scale"]
            staged.pwrite(*plan.location(gs_out)[:2], _bytes(gs.to(torch.float32).reshape(gs_out.shape)))
            if "input_scale" in outs:  # W4A4: from the calibrated table (calibrate/scales.py)
                from ..calibrate.scales import input_scale

                o = outs["input_scale"]
                x = input_scale(plan.format, plan.input_amax[piece.tensor[: -len(".weight")]])
                staged.pwrite(*plan.location(o)[:2], _bytes(x.reshape(o.shape)))
    held.clear()


def _finalize(plan: ConversionPlan, staged: StagedOutput, index: CheckpointIndex, overwrite: bool) -> None:
    weight_map = {name: f for name, f in sorted(plan.file_of.items())}
    index_json = {"metadata": {"total_size": sum(o.nbytes for outs in plan.outputs.values() for o in outs)},
                  "weight_map": weight_map}
    extra = {"config.json": output_config(index.config, plan.target, plan.format, plan.ignore, plan.w4a4)}
    if plan.format == "modelopt":
        extra["hf_quant_config.json"] = modelopt_hf_quant_config(plan.ignore, plan.w4a4)
    staged.finalize(index_json, extra, index.path, overwrite)
