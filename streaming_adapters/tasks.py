"""What each recipe task does, given a validated config and an initialised process group."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint.index import CheckpointIndex
from .dist import all_gather_object, is_dist, raise_on_all_ranks
from .errors import CheckpointError
from .formats import get_adapter
from .layouts import Layout, build_state_dict, make_mesh
from .preflight import GiB, Preflight, plan_convert, plan_load, refuse_if_unfit


def rank0() -> bool:
    return not is_dist() or dist.get_rank() == 0


def say(msg: str) -> None:
    if rank0():
        print(msg, flush=True)


def fabricate_if_asked(cfg) -> None:
    fab = cfg.checkpoint.fabricate
    if fab.family is None:
        return
    path = Path(cfg.checkpoint.path)
    error = None
    if rank0() and not (path / "model.safetensors.index.json").exists():
        from .testing.fixtures import make_checkpoint

        try:
            info = make_checkpoint(path, fab.family, fab.format, seed=fab.seed, **dict(fab.config))
            say(f"fabricated a {fab.family} {fab.format} checkpoint at {path} "
                f"({sum((path / f).stat().st_size for f in info.files) / 1e6:.1f} MB)")
        except (ValueError, TypeError, KeyError) as e:
            error = CheckpointError(f"cannot fabricate: {e}", file=str(path),
                                    fix="check checkpoint.fabricate.family / format / config")
    raise_on_all_ranks(error)


def capacities(cfg, local_world: int) -> tuple[float | None, float | None]:
    host = cfg.host_memory_gb * GiB if cfg.host_memory_gb else None
    gpu = cfg.gpu_memory_gb * GiB if cfg.gpu_memory_gb else None
    if host is None:
        import psutil

        host = psutil.virtual_memory().total / max(1, local_world)
    if gpu is None and cfg.device == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return host, gpu


def preflight(cfg, layout: Layout) -> Preflight:
    from .checkpoint.coverage import check_coverage

    index = CheckpointIndex.open(cfg.checkpoint.path)
    check_coverage(index)
    adapter = get_adapter(cfg.checkpoint.path, index=index)
    host, gpu = capacities(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size)))
    chunk = cfg.io.chunk_mb << 20
    if cfg.task in ("dequantize_bf16", "fp8_to_nvfp4"):
        from .convert.plan import make_plan

        target = "bf16" if cfg.task == "dequantize_bf16" else "nvfp4"
        plan = make_plan(index, adapter, target, cfg.output.format, layout.world_size,
                         step_bytes=int(cfg.io.step_mb * (1 << 20)), ignore=list(cfg.output.ignore))
        pf = plan_convert(plan, cfg.device, chunk, host, gpu, layout)
        if target == "nvfp4" and cfg.calibration.data is not None:  # W4A4: the calibration's need too
            from .calibrate import plan as cplan

            need = cplan.calibration_need(adapter.plan.logical, index.config, _calibration(cfg), layout.world_size)
            pf.notes += need.lines(cfg.device)
            pf.problems += cplan.problems(need, cfg.device, host, gpu)
        return pf
    return plan_load(index, adapter, layout, device=cfg.device, chunk_bytes=chunk, io_backend=cfg.io.backend,
                     host_capacity=host, gpu_capacity=gpu)


def run_task(cfg, layout: Layout) -> dict[str, Any]:
    fabricate_if_asked(cfg)
    if cfg.checkpoint.path is None:
        raise CheckpointError("no checkpoint given", expected="checkpoint.path=<folder>",
                              fix="pass checkpoint.path=..., and checkpoint.fabricate.family=llama to fabricate one")
    if cfg.task == "benchmark":
        from .bench.harness import run_benchmark

        return run_benchmark(cfg)
    if cfg.task == "evaluate":  # rows split over every rank; no load plan (docs/evaluate.md)
        from .quality.task import run_evaluate

        return run_evaluate(cfg)
    error, pf = None, None
    try:
        pf = preflight(cfg, layout)
    except CheckpointError as e:
        error = e
    raise_on_all_ranks(error)
    if cfg.task == "plan" or cfg.dry_run:
        say(pf.table())
        return {"task": "plan", "fits": pf.fits, "ranks": [vars(r) for r in pf.ranks],
                "naive_bytes": pf.naive_bytes, "problems": pf.problems}
    refuse_if_unfit(pf)
    if cfg.task == "load_check":
        return load_check(cfg, layout, pf)
    return convert(cfg, pf)


def load_check(cfg, layout: Layout, pf: Preflight) -> dict[str, Any]:
    from . import load_fp8_state_dict
    from .report import rss_anon_bytes

    rank = dist.get_rank() if is_dist() else 0
    device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
    index = CheckpointIndex.open(cfg.checkpoint.path)
    adapter = get_adapter(cfg.checkpoint.path, index=index)
    mesh = make_mesh(layout, device)
    host0 = rss_anon_bytes()
    sd, boxes = build_state_dict(adapter.plan.logical, layout, rank, device, mesh=mesh)
    report = load_fp8_state_dict(sd, cfg.checkpoint.path, chunk_bytes=cfg.io.chunk_mb << 20,
                                 io_backend=cfg.io.backend, readers=cfg.io.readers)
    mismatches = verify_shards(sd, boxes, index, adapter) if cfg.verify else None
    peak_total = max(report.peak_host_bytes, rss_anon_bytes()) - host0
    out = report.to_dict()
    out["planned"] = [vars(r) for r in pf.ranks]
    out["host_increase_bytes"] = all_gather_object(peak_total)
    if mismatches is not None:
        bad = all_gather_object(mismatches)
        out["verify"] = {"mismatched_tensors": sum(len(b) for b in bad), "examples": [x for b in bad for x in b][:5]}
        say(f"verify: {out['verify']['mismatched_tensors']} mismatched shard(s)")
    say(report.summary_line())
    return out


def verify_shards(sd, boxes, index, adapter) -> list[str]:
    """Each local shard against a whole-tensor reference: the stored tensor read with safetensors,
    scale grid expanded, ``(fp32(w) * fp32(s)).to(bf16)`` -- one tensor at a time."""
    from safetensors import safe_open

    from .numerics.fp8 import decode_scales

    bad = []
    for name, dt in sd.items():
        lt = adapter.plan.logical[name]
        with safe_open(index.file_path(lt.stored.file), "pt") as f:
            w = f.get_tensor(name)
        if lt.decoder is not None:  # NVFP4: the whole-tensor decode of numerics/nvfp4.py (checked vs producers)
            w = _decode_whole(index, lt)
        elif lt.scale is not None:
            with safe_open(index.file_path(lt.scale.tensor.file), "pt") as f:
                s = decode_scales(f.get_tensor(lt.scale.tensor.name), lt.scale.encoding).reshape(lt.scale.grid)
            for d, b in enumerate(lt.scale.block):
                s = s.repeat_interleave(b, d).narrow(d, 0, w.shape[d])
            w = (w.to(torch.float32) * s).to(torch.bfloat16)
        start, length = boxes[name]
        for d, (a, n) in enumerate(zip(start, length)):
            w = w.narrow(d, a, n)
        local = dt.to_local().cpu().contiguous()
        want = w.to(local.dtype).contiguous()
        if local.shape != want.shape or not torch.equal(local.reshape(-1).view(torch.uint8),
                                                        want.reshape(-1).view(torch.uint8)):
            bad.append(name)  # compared bit for bit: NaN == NaN, -0.0 != 0.0
    return bad


def _decode_whole(index, lt) -> torch.Tensor:
    from safetensors import safe_open

    from .numerics import nvfp4

    parts = []
    for info in (lt.stored, lt.decoder.block_scale, lt.decoder.global_scale):
        with safe_open(index.file_path(info.file), "pt") as f:
            parts.append(f.get_tensor(info.name))
    decode = nvfp4.dequantize_ct if lt.decoder.rule == "ct" else nvfp4.dequantize_modelopt
    return decode(*parts)


def convert(cfg, pf: Preflight) -> dict[str, Any]:
    from .convert import convert_checkpoint

    if not cfg.output.path:
        raise CheckpointError("no output folder given", expected="output.path=<folder>",
                              fix="pass output.path=... (it must not exist, or pass output.overwrite=true)")
    device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
    target = "bf16" if cfg.task == "dequantize_bf16" else "nvfp4"
    report = convert_checkpoint(
        cfg.checkpoint.path, cfg.output.path, target=target, format=cfg.output.format,
        step_bytes=int(cfg.io.step_mb * (1 << 20)), chunk_bytes=cfg.io.chunk_mb << 20, io_backend=cfg.io.backend,
        ignore=list(cfg.output.ignore), overwrite=cfg.output.overwrite, restart=cfg.output.restart,
        device=device, sync_every_s=cfg.io.sync_s, readers=cfg.io.readers, progress=cfg.report.progress,
        calibration=_calibration(cfg) if target == "nvfp4" else None,
    )
    out = report.to_dict()
    out["planned"] = [vars(r) for r in pf.ranks]
    if cfg.verify:  # BF16 output: every tensor bit for bit; NVFP4: the producers' math (convert/verify.py)
        from .convert.verify import verify_checkpoint

        v = verify_checkpoint(cfg.output.path, reference=cfg.checkpoint.path)
        out["verify"] = v.to_dict()
        say(v.table())
    say(report.summary_line())
    return out


def job_totals(out: dict[str, Any]) -> dict[str, Any]:
    """report.json's top level: the job's numbers as the summary line shows them (bytes and tensors summed
    over ranks, seconds the slowest rank's, GB/s = total bytes / that wall time, peaks the largest rank's);
    each rank's own numbers stay under ``ranks``."""
    ranks = out.get("ranks") or []
    if not ranks or "bytes_read" not in out:
        return out
    job = dict(out)
    job.pop("rank", None)  # the rank that wrote the file is not a property of the job
    for key in ("tensors", "quantized", "plain", "bytes_read"):
        job[key] = sum(r.get(key, 0) for r in ranks)
    job["seconds"] = max(r.get("seconds", 0.0) for r in ranks)
    job["gb_per_s"] = job["bytes_read"] / job["seconds"] / 1e9 if job["seconds"] > 0 else 0.0
    for key in ("peak_transient_bytes", "peak_host_bytes", "peak_gpu_bytes"):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        job[key] = max(vals) if vals else None
    job["ranks"] = ranks
    return job


def report_path(cfg, result: dict[str, Any]) -> Path | None:
    """report.path; else inside the output folder (conversions) or beside benchmark.md (benchmark); else
    none: load_check and plan have no output folder, and the working folder is never written by default."""
    if cfg.report.path:
        return Path(cfg.report.path)
    if cfg.task in ("dequantize_bf16", "fp8_to_nvfp4") and cfg.output.path and Path(cfg.output.path).is_dir():
        return Path(cfg.output.path) / "report.json"
    if result.get("report_dir"):
        return Path(result["report_dir"]) / "report.json"
    return None
def _calibration(cfg):
    """``calibration.data`` set: W4A4 (docs/calibration.md); the recipe node as the dataclass."""
    from .calibrate.config import CalibrationConfig

    c = cfg.calibration
    if c.data is None:
        return None
    return CalibrationConfig(**{k: c[k] for k in c}) if not isinstance(c, CalibrationConfig) else c


def write_report(cfg, result: dict[str, Any], rank: int) -> Path | None:
    if rank != 0:
        return None
    path = report_path(cfg, result)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job_totals(result), indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if hasattr(o, "__dict__"):
        return vars(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
