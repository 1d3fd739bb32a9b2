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

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..dist import raise_on_all_ranks, rank_and_world
from ..read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES
from .options import ConvertOptions
from .plan import DEFAULT_STEP_BYTES
from .report import ConvertReport
from .run import RESTART_HINT, Conversion, ConversionInterrupted
from .steps import Role, _named

__all__ = ["RESTART_HINT", "Conversion", "ConversionInterrupted", "ConvertOptions", "Role", "convert_checkpoint"]


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
    options = error = None
    try:
        options = ConvertOptions(
            target=target, format=format, step_bytes=step_bytes, chunk_bytes=chunk_bytes, io_backend=io_backend,
            ignore=ignore, overwrite=overwrite, restart=restart, device=device, sync_every_s=sync_every_s,
            gpu_pipeline=gpu_pipeline, readers=readers, progress=progress, verbose=verbose, calibration=calibration)
    except Exception as e:  # noqa: BLE001 -- ranks may pass different values: every rank must learn of it
        error = _named(e, rank_and_world(process_group)[0], Path(src))
    raise_on_all_ranks(error, process_group)
    return Conversion(src, dst, options, process_group).run()
