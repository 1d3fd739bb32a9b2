"""``verify_checkpoint``: what a user looks at before deploying a converted checkpoint.

Both checkpoints are dequantized row chunk by row chunk (never a whole tensor): the reference FP8 by
``verify_reference.py``, which shares no code with the conversion's writer (the ``safetensors`` library
and plain torch), the NVFP4 output with the decoder of its format's output target (compressed-tensors:
``s8 / gs``; ModelOpt: ``s8 * w2``).  Per tensor: relative error ``||out - ref|| / ||ref||``, SNR in dB and the max
absolute error; BF16 and copied tensors must match bit for bit.  The fused-group rule is checked: every
member of q/k/v, gate/up, q_a/kv_a, w1/w3 carries the same global scale, and it is the one the group's
amax gives.  Tensors are spread over the ranks of ``process_group`` and the results gathered.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint.byteio import BoxReader
from ..checkpoint.index import CheckpointIndex
from ..dist import all_gather_object, rank_and_world, run_then_gather
from ..errors import CheckpointError
from ..formats import get_adapter
from ..formats.outputs import OutputTarget, get_target, target_of_config
from ..models.families import get_family
from .plan import unit_key
from .verify_reference import ReferenceReader

ROW_CHUNK_ELEMS = 1 << 22


@dataclass
class TensorCheck:
    name: str
    kind: str                     # nvfp4 | bf16 | copy
    rel_error: float = 0.0
    snr_db: float = math.inf
    max_abs_error: float = 0.0
    global_scale: float | None = None
    exact: bool = True
    ref_amax: float = 0.0


@dataclass
class VerifyReport:
    output: str
    reference: str
    format: str | None
    tensors: list[TensorCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fused_violations: list[str] = field(default_factory=list)
    fused_groups: int = 0
    input_scales: int = 0                                    # W4A4: activation scales checked
    input_scale_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        plain_ok = all(t.exact for t in self.tensors if t.kind != "nvfp4")
        return plain_ok and not self.missing and not self.fused_violations and not self.input_scale_problems

    @property
    def worst_snr_db(self) -> float:
        return min((t.snr_db for t in self.tensors if t.kind == "nvfp4"), default=math.inf)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["worst_snr_db"] = self.worst_snr_db
        return json.loads(json.dumps(d, default=str).replace("Infinity", "null"))

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self, rows: int = 8) -> str:
        q = sorted((t for t in self.tensors if t.kind == "nvfp4"), key=lambda t: t.snr_db)
        lines = [f"verify {self.output} against {self.reference} ({self.format or 'bf16'}): "
                 f"{'OK' if self.ok else 'PROBLEMS'}",
                 f"  {len(q)} NVFP4 tensors: worst SNR {self.worst_snr_db:.2f} dB, median "
                 f"{q[len(q) // 2].snr_db if q else math.inf:.2f} dB; "
                 f"{sum(1 for t in self.tensors if t.kind != 'nvfp4')} other tensors "
                 f"{'all exact' if all(t.exact for t in self.tensors if t.kind != 'nvfp4') else 'NOT exact'}; "
                 f"{self.fused_groups} fused groups, {len(self.fused_violations)} violations; "
                 f"{len(self.missing)} missing"]
        if q:
            lines.append(f"  {'tensor':<60} {'rel err':>9} {'SNR dB':>8} {'max |err|':>10}")
            for t in q[:rows]:
                lines.append(f"  {t.name:<60} {t.rel_error:>9.4f} {t.snr_db:>8.2f} {t.max_abs_error:>10.3g}")
        for v in self.fused_violations[:5]:
            lines.append(f"  fused-group violation: {v}")
        if self.input_scales or self.input_scale_problems:
            lines.append(f"  W4A4: {self.input_scales} input scales, {len(self.input_scale_problems)} problems")
        for v in self.input_scale_problems[:5]:
            lines.append(f"  input-scale problem: {v}")
        for m in self.missing[:5]:
            lines.append(f"  missing in output: {m}")
        return "\n".join(lines)


def _output_target(cfg: dict) -> OutputTarget:
    target = target_of_config(cfg)
    if target is None:
        raise CheckpointError("the output is not an NVFP4 or BF16 checkpoint", file="config.json",
                              expected="nvfp4-pack-quantized (compressed-tensors) or W4A16_NVFP4 / NVFP4 (modelopt)",
                              fix="pass the folder written by convert_checkpoint")
    return target


def verify_checkpoint(
    nvfp4_dir: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    process_group=None,
    report_path: str | os.PathLike | None = None,
) -> VerifyReport:
    """Compare a converted checkpoint with its FP8 reference, tensor by tensor, streaming."""
    rank, world = rank_and_world(process_group)

    def mine():  # an error on one rank is raised on every rank (run_then_gather), never a hang
        out_idx = CheckpointIndex.open(nvfp4_dir)
        ref_idx = CheckpointIndex.open(reference)
        ref_adapter = get_adapter(reference, index=ref_idx)
        target = _output_target(out_idx.config)
        logical = ref_adapter.plan.logical
        names = sorted(logical, key=lambda n: -math.prod(logical[n].shape))
        checks, missing = [], []
        with ReferenceReader(ref_idx) as ref, BoxReader(out_idx.path) as oio:
            for name in [n for i, n in enumerate(names) if i % world == rank]:
                try:
                    checks.append(_check_tensor(name, logical[name], ref, oio, out_idx, target))
                except KeyError as e:
                    missing.append(f"{name} ({e.args[0]})")
        report = VerifyReport(str(out_idx.path), str(ref_idx.path), target.format)
        return report, checks, missing, get_family(ref_idx.config)

    report, checks, missing, family = run_then_gather(mine, process_group)
    for part in all_gather_object((checks, missing), process_group):
        report.tensors += part[0]
        report.missing += part[1]
    report.tensors.sort(key=lambda t: t.name)
    _check_fused(report, family)  # the reference's family, from the index opened above
    from ..calibrate.verify import check_input_scales

    out_idx = CheckpointIndex.open(nvfp4_dir)  # opened without error on every rank above (headers only)
    target = _output_target(out_idx.config)
    fmt = target.format
    if target.is_w4a4(out_idx.config):
        with BoxReader(out_idx.path) as oio:
            mods = [t.name[: -len(".weight")] for t in report.tensors if t.kind == "nvfp4"]
            report.input_scales, report.input_scale_problems = check_input_scales(
                mods, fmt, lambda n: float(oio.read(out_idx[n]).float().reshape(-1)[0]) if n in out_idx else None,
                family)
    if report_path is not None and rank == 0:
        report.to_json(report_path)
    return report


def _row_chunks(shape: tuple[int, ...]):
    """``[r0, r1)`` row ranges of about ``ROW_CHUNK_ELEMS`` elements (one row at least)."""
    rows = shape[0]
    step = max(1, ROW_CHUNK_ELEMS // max(1, math.prod(shape[1:])))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _check_tensor(name, lt, ref: ReferenceReader, oio: BoxReader, out_idx: CheckpointIndex,
                  target: OutputTarget) -> TensorCheck:
    mod = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = target.quantized_parts(mod, out_idx)
    if parts is None:
        out = out_idx.tensors[name]
        check = TensorCheck(name, "bf16" if lt.scale is not None else "copy")
        if tuple(out.shape) != tuple(lt.shape):
            check.exact = False
            return check
        if not lt.shape:  # 0-dim plain tensor
            check.exact = _same_bytes(oio.read(out), ref.stored_rows(lt, 0, 0))
            return check
        for r0, r1 in _row_chunks(lt.shape):
            want = ref.bf16_rows(lt, r0, r1) if lt.scale is not None else ref.stored_rows(lt, r0, r1)
            got = oio.read(out, (r0,) + (0,) * (len(lt.shape) - 1), (r1 - r0, *lt.shape[1:]))
            if not _same_bytes(got, want):
                check.exact = False
                break
        return check
    packed, scale, gscale = parts
    gs = oio.read(gscale).to(torch.float32).reshape(())
    check = TensorCheck(name, "nvfp4", global_scale=float(gs), exact=False)
    n_rows, k = lt.shape
    err2 = ref2 = 0.0
    amax = 0.0
    for r0, r1 in _row_chunks(lt.shape):
        want = ref.bf16_rows(lt, r0, r1).float()
        p = oio.read(packed, (r0, 0), (r1 - r0, packed.shape[1]))
        sc = oio.read(scale, (r0, 0), (r1 - r0, scale.shape[1]))
        d = target.decode(p, sc, gs).float() - want
        err2 += float((d * d).sum(dtype=torch.float64))
        ref2 += float((want ** 2).sum(dtype=torch.float64))
        check.max_abs_error = max(check.max_abs_error, float(d.abs().max()))
        amax = max(amax, float(want.abs().max()))
    check.ref_amax = amax
    check.rel_error = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    check.snr_db = 10 * math.log10(ref2 / err2) if err2 > 0 else math.inf
    return check


def _same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.numel() == want.numel() and torch.equal(
        got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def _check_fused(report: VerifyReport, family=None) -> None:
    """Members of a fused group share one global scale, and it is the one the group's amax gives."""
    groups: dict[tuple, list[TensorCheck]] = {}
    for t in report.tensors:
        if t.kind == "nvfp4" and (key := unit_key(t.name, family)) is not None:
            groups.setdefault(key, []).append(t)
    report.fused_groups = sum(1 for g in groups.values() if len(g) > 1)
    target = get_target(report.format) if report.format else None
    for key, members in sorted(groups.items()):
        amax = torch.tensor(max(m.ref_amax for m in members), dtype=torch.bfloat16)
        want = float(target.global_scale(amax))
        scales = {m.global_scale for m in members}
        if len(scales) != 1 or scales.pop() != want:
            report.fused_violations.append(
                f"{key[0]} {[m.name.rsplit('.', 2)[-2] for m in members]}: global scales "
                f"{[m.global_scale for m in members]}, group amax gives {want}")
