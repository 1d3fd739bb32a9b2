"""W4A4 inside ``convert_checkpoint``: read the tokens before anything runs, then calibrate (or reuse the
table of an interrupted run) between the plan and the first written step.

The table is the handoff to the conversion writer, which quantizes the weights exactly as for W4A16 and
adds each Linear's input scale from it (``scales.input_scale``).  Rank 0 keeps it in
``<dst>.partial/.streaming_adapters/calibration.json``: a run killed while writing resumes without
calibrating again (the fingerprint of the plan already holds the tokens' sha256).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..dist import all_gather_object, raise_on_all_ranks, rank_and_world
from ..errors import CheckpointError
from ..models.families import Family
from .config import CalibrationConfig
from .data import CalibrationTokens, load_calibration_tokens
from .engine import CalibrationResult, calibrate_activations
from .scales import unify

TABLE = "calibration.json"


def as_config(calibration: CalibrationConfig | str | os.PathLike | None) -> CalibrationConfig | None:
    if calibration is None or isinstance(calibration, CalibrationConfig):
        return calibration if calibration is None or calibration.data is not None else None
    return CalibrationConfig(data=str(calibration))


def moe_rule(cal: CalibrationConfig, fmt: str | None) -> bool:
    """True: every expert sees every token (llm-compressor); False: routed tokens, expert max (ModelOpt)."""
    return cal.moe_all_experts if cal.moe_all_experts is not None else fmt != "modelopt"


def attention(fmt: str | None, cal: CalibrationConfig | None = None) -> str:
    """``calibration.attention`` if set, else the attention the format's producer calibrates with
    (skeleton.py): llm-compressor forces eager, ModelOpt keeps transformers' default (sdpa)."""
    if cal is not None and cal.attention is not None:
        return cal.attention
    return "sdpa" if fmt == "modelopt" else "eager"


def read_tokens(src: Path, cal: CalibrationConfig) -> CalibrationTokens:
    return load_calibration_tokens(cal.data, checkpoint=src, tokenizer=cal.tokenizer, samples=cal.samples,
                                   seq_len=cal.seq_len)


def calibration_table(plan, src: Path, tokens: CalibrationTokens, cal: CalibrationConfig, book: Path,
                      group: dist.ProcessGroup | None, device: torch.device, progress: bool,
                      family: Family | None = None) -> CalibrationResult:
    """The plan's input amax table: from ``book / calibration.json`` if an earlier run of this same plan
    wrote it, else measured now (every rank) and written by rank 0.  Sets ``plan.input_amax``, equal within
    each of ``family``'s input-sharing (fused) groups."""
    rank, _ = rank_and_world(group)
    found: dict[str, Any] | None = None
    if rank == 0 and (book / TABLE).exists():
        found = json.loads((book / TABLE).read_text())
    found = all_gather_object(found, group)[0]
    targets = {n[: -len(".weight")] for n, q in plan.nvfp4.items() if q}
    if found is not None and found.get("tokens_sha256") == tokens.sha256:
        result = CalibrationResult(**{**found, "layers": found.get("layers", [])})
    else:
        work = Path(cal.work_dir) if cal.work_dir else book / "calibration"
        result = calibrate_activations(
            src, tokens, targets, process_group=group, device=device,
            host_budget_bytes=int(cal.host_budget_gb * (1 << 30)), work_dir=work,
            moe_all_experts=plan.calibration["moe_all_experts"], attn_implementation=plan.calibration["attention"],
            persist_every_s=cal.persist_every_s, progress=progress)
        error = None
        if rank == 0:
            try:
                tmp = book / (TABLE + ".tmp")
                tmp.write_text(json.dumps(result.to_dict(), indent=1))
                os.replace(tmp, book / TABLE)
            except OSError as e:
                error = CheckpointError(f"cannot save the calibration table: {e}", file=str(book / TABLE),
                                        fix="check free space and permissions of the output folder")
        raise_on_all_ranks(error, group)
    plan.input_amax = unify(result.amax, experts=not plan.calibration["moe_all_experts"], family=family)
    return result
