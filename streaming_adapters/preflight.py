"""Pre-flight: from headers only, what each rank will read and hold, and whether the layout fits.

Per rank: bytes read (its FP8 boxes, the scale windows they touch, its plain tensors), the BF16 shard it
fills, the transient budget, and the memory it needs on host and GPU.  Beside it, the naive path that
``FineGrainedFP8Config(dequantize=True)`` takes: the whole BF16 model on every rank.  A layout that does not
fit is refused with the layouts of the same world size that would.

Memory model (what a load allocates on top of the process baseline):
  CPU destination:  shard + transient (the numerics' sub-chunk scratch, ~5 MiB; pread, the default: + the
                    one staging buffer, at most min(chunk_bytes, the largest box): read/cpu.py)
  CUDA destination: GPU shard + the pipeline's device staging ring (3 x 32 MiB; the Triton kernel needs
                    no scratch); host: its pinned ring (8 x 32 MiB)
Conversion: the rank's BF16 share of its largest step + its NVFP4 output of one piece + chunk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .checkpoint.index import CheckpointIndex
from .errors import CheckpointError
from .formats import LogicalTensor, StreamingFP8StateDictAdapter
from .layouts import Layout, counts, local_box
from .models.families import get_family
from .numerics.fp8 import CPU_SUBCHUNK_ELEMS, block_window
from .read import DEFAULT_BACKEND, DEFAULT_DEPTH, DEFAULT_HOST_DEPTH, DEFAULT_PIPELINE_CHUNK
from .report import _fmt_bytes

GiB = 1 << 30
# Scratch of the CPU LUT path: int32 index + table for one sub-chunk (see numerics/fp8.py), plus slack
# for the sampler's resolution.
CPU_SCRATCH = CPU_SUBCHUNK_ELEMS * 4 + (1 << 20)


@dataclass
class RankPlan:
    rank: int
    read_bytes: int = 0
    shard_bytes: int = 0
    transient_bytes: int = 0
    host_bytes: int = 0
    gpu_bytes: int = 0
    tensors: int = 0


@dataclass
class Preflight:
    task: str
    layout: Layout
    device: str
    ranks: list[RankPlan]
    naive_bytes: int
    checkpoint_bytes: int
    host_capacity: float | None = None
    gpu_capacity: float | None = None
    problems: list[str] = field(default_factory=list)
    fitting: list[tuple[Layout, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)       # extra lines (W4A4 calibration's need)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = [f"pre-flight: {self.task} on {self.layout.world_size} rank(s) "
                 f"(tp={self.layout.tp} dp_shard={self.layout.dp_shard} pp={self.layout.pp} ep={self.layout.ep}), "
                 f"device={self.device}, checkpoint {_fmt_bytes(self.checkpoint_bytes)}",
                 f"{'rank':>4} {'reads':>10} {'BF16 shard':>11} {'transient':>10} {'host need':>10} {'GPU need':>10}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4} {_fmt_bytes(r.read_bytes):>10} {_fmt_bytes(r.shard_bytes):>11} "
                         f"{_fmt_bytes(r.transient_bytes):>10} {_fmt_bytes(r.host_bytes):>10} "
                         f"{_fmt_bytes(r.gpu_bytes) if self.device == 'cuda' else '-':>10}")
        lines.append(f"naive path (FineGrainedFP8Config(dequantize=True)): the whole BF16 model on every rank = "
                     f"{_fmt_bytes(self.naive_bytes)} per rank")
        if self.device == "cuda" and self.gpu_capacity is None:
            lines.append(f"GPU capacity unknown (no GPU visible here): each rank needs "
                         f"{_fmt_bytes(max((r.gpu_bytes for r in self.ranks), default=0))} of GPU memory; pass "
                         f"gpu_memory_gb=<per GPU> (e.g. 80 for an H100) to check the fit")
        lines += self.notes
        if self.problems:
            lines += [f"DOES NOT FIT: {p}" for p in self.problems]
        if self.fitting:
            lines.append("layouts of this world size that fit: " + ", ".join(
                f"tp={lay.tp} dp_shard={lay.dp_shard} pp={lay.pp} ep={lay.ep} ({_fmt_bytes(need)}/rank)"
                for lay, need in self.fitting[:5]))
        return "\n".join(lines)


def _bf16_bytes(lt: LogicalTensor, box_len: tuple[int, ...]) -> int:
    n = math.prod(box_len)
    return n * (2 if lt.scale is not None else lt.stored.itemsize)


def _read_bytes(lt: LogicalTensor, start, length) -> int:
    n = math.prod(length) * lt.stored.itemsize
    if lt.scale is not None:
        lo, hi = block_window(start, length, lt.scale.block)
        n += math.prod(h - l for h, l in zip(hi, lo)) * lt.scale.tensor.itemsize
    return n


def plan_load(index: CheckpointIndex, adapter: StreamingFP8StateDictAdapter, layout: Layout, *,
              device: str = "cpu", chunk_bytes: int = 64 << 20, io_backend: str = DEFAULT_BACKEND,
              host_capacity: float | None = None, gpu_capacity: float | None = None,
              suggest: bool = True) -> Preflight:
    logical = adapter.plan.logical
    family = get_family(index.config)
    num_layers, num_experts = counts(logical, family)
    ranks = []
    for rank in range(layout.world_size):
        rp = RankPlan(rank)
        largest = 0
        for name, lt in logical.items():
            box = local_box(name, lt.shape, layout, rank, num_layers, num_experts, family)
            if box is None or math.prod(box[1]) == 0:
                continue
            rp.tensors += 1
            rp.read_bytes += _read_bytes(lt, *box)
            rp.shard_bytes += _bf16_bytes(lt, box[1])
            largest = max(largest, math.prod(box[1]) * lt.stored.itemsize)
        chunk = min(chunk_bytes, largest)
        if device == "cuda":
            # The GPU pipeline: device staging ring (codes; the Triton kernel needs no scratch) on the GPU,
            # the pinned ring on the host (read/cuda.py).
            piece = min(chunk, DEFAULT_PIPELINE_CHUNK)
            rp.transient_bytes = DEFAULT_DEPTH * piece
            rp.gpu_bytes = rp.shard_bytes + rp.transient_bytes
            rp.host_bytes = DEFAULT_HOST_DEPTH * piece
        else:
            # pread (the default): the CPU executor's one staging buffer, its largest chunk (read/cpu.py).
            rp.transient_bytes = CPU_SCRATCH + (chunk if io_backend == "pread" else 0)
            rp.host_bytes = rp.shard_bytes + rp.transient_bytes
        ranks.append(rp)
    naive = sum(_bf16_bytes(lt, lt.shape) for lt in logical.values())
    pf = Preflight("load", layout, device, ranks, naive, index.total_bytes, host_capacity, gpu_capacity)
    _check_fit(pf)
    if pf.problems and suggest:
        pf.fitting = _fitting_layouts(index, adapter, layout.world_size, device, chunk_bytes, io_backend,
                                      host_capacity, gpu_capacity)
    return pf


def _need(pf: Preflight) -> int:
    return max((r.gpu_bytes if pf.device == "cuda" else r.host_bytes) for r in pf.ranks)


def _check_fit(pf: Preflight) -> None:
    for r in pf.ranks:
        if pf.host_capacity is not None and r.host_bytes > pf.host_capacity:
            pf.problems.append(f"rank {r.rank} needs {_fmt_bytes(r.host_bytes)} of host memory, "
                               f"{_fmt_bytes(pf.host_capacity)} available")
        if pf.device == "cuda" and pf.gpu_capacity is not None and r.gpu_bytes > pf.gpu_capacity:
            pf.problems.append(f"rank {r.rank} needs {_fmt_bytes(r.gpu_bytes)} of GPU memory, "
                               f"{_fmt_bytes(pf.gpu_capacity)} available")


def _fitting_layouts(index, adapter, world, device, chunk_bytes, io_backend, host_cap, gpu_cap):
    out = []
    divs = [d for d in range(1, world + 1) if world % d == 0]
    for tp, dp, pp in itertools.product(divs, divs, divs):
        if world % (tp * dp * pp) or tp * dp * pp > world:
            continue
        ep = world // (tp * dp * pp)
        lay = Layout(tp, dp, pp, ep)
        pf = plan_load(index, adapter, lay, device=device, chunk_bytes=chunk_bytes, io_backend=io_backend,
                       host_capacity=host_cap, gpu_capacity=gpu_cap, suggest=False)
        if pf.fits:
            out.append((lay, _need(pf)))
    return sorted(out, key=lambda x: (x[1], x[0].tp))


def plan_convert(plan, device: str = "cpu", chunk_bytes: int = 64 << 20, host_capacity: float | None = None,
                 gpu_capacity: float | None = None, layout: Layout | None = None) -> Preflight:
    """Per-rank numbers of a conversion plan (``convert.plan.ConversionPlan``)."""
    world = max(max(s.pieces) for s in plan.steps) + 1 if plan.steps else 1
    ranks = [RankPlan(r) for r in range(world)]
    for step in plan.steps:
        held = [0] * world
        for r, pieces in step.pieces.items():
            for p in pieces:
                lt = plan.logical[p.tensor]
                length = (p.r1 - p.r0, *lt.shape[1:])
                ranks[r].read_bytes += _read_bytes(lt, (p.r0,) + (0,) * (len(lt.shape) - 1), length)
                ranks[r].tensors += 1
                if plan.nvfp4[p.tensor]:
                    held[r] += _bf16_bytes(lt, length)
        for r in range(world):
            ranks[r].shard_bytes = max(ranks[r].shard_bytes, held[r])
    for rp in ranks:
        # The NVFP4 output of the largest piece is 0.5625 B/element = 28% of its BF16.
        rp.transient_bytes = CPU_SCRATCH + min(chunk_bytes, 64 << 20) + int(rp.shard_bytes * 0.29)
        if device == "cuda":
            rp.gpu_bytes = rp.shard_bytes + rp.transient_bytes
        else:
            rp.host_bytes = rp.shard_bytes + rp.transient_bytes
    naive = sum(_bf16_bytes(lt, lt.shape) for lt in plan.logical.values())
    pf = Preflight(f"convert -> {plan.target}", layout or Layout(dp_shard=world), device, ranks, naive,
                   sum(lt.stored.nbytes for lt in plan.logical.values()), host_capacity, gpu_capacity)
    _check_fit(pf)
    return pf


def refuse_if_unfit(pf: Preflight) -> None:
    if pf.fits:
        return
    fits = ", ".join(f"tp={lay.tp} dp_shard={lay.dp_shard} pp={lay.pp} ep={lay.ep}" for lay, _ in pf.fitting[:5])
    raise CheckpointError(
        "the chosen layout does not fit: " + "; ".join(pf.problems[:3]),
        expected=f"per-rank memory within capacity ({_fmt_bytes(pf.host_capacity) if pf.host_capacity else '-'} "
        f"host, {_fmt_bytes(pf.gpu_capacity) if pf.gpu_capacity else '-'} GPU)",
        fix=(f"use a layout that fits: {fits}" if fits else "add ranks (nodes or GPUs): no layout of this "
             "world size fits") + "; see `streaming-adapters plan` for the numbers",
    )
