"""The per-layer calibration loop: one decoder layer real at a time, every sample through it.

Per decoder layer ``i`` on each rank: fill the layer from the FP8 checkpoint (``Skeleton.fill_layer``, the
project's reader, bit-exact BF16), hook every target ``nn.Linear`` with a forward-pre hook keeping a running
``max |x|`` in BF16 (llm-compressor's ``static_minmax``, ModelOpt's ``MaxCalibrator``), run the rank's
samples through the layer one at a time (batch 1), store the layer's **unquantized** outputs as the next
layer's inputs (what both producers do, formats.md §4), free the layer.  Then one all-reduce MAX of the
layer's amax vector over the ranks (fp32: exact for BF16 values; gloo has no BF16 MAX).

Ranks split the samples (contiguous, balanced by tokens); since max is exact and order-free, the table
is the same bits for any world size.

Resume (spilled runs): after each layer every rank records ``state-rank{r}.json`` in ``work_dir`` (layer,
which spill file holds its outputs, the amax so far, tokens' sha256, world size).  A re-run whose ranks all
find the same layer with the same tokens and world size continues after it; the spill files are
ping-pong, so the finished layer's outputs are intact whatever a kill interrupted.  Runs with the hidden states
in memory save them to ``work_dir`` (written beside, fsynced, renamed in) after the first layer that ends
``persist_every_s`` after the last save, every rank at the same layer, and resume from there the same way.

Memory per rank: one decoder layer (BF16) + the embedding + one sample's activations on ``device``; the
rank's hidden states on the host (``store.HiddenStore``: within ``host_budget_bytes``, else spilled).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..dist import all_gather_object, collective_device, every_rank_raises, is_dist, rank_and_world
from ..errors import CheckpointError
from ..report import MemoryMonitor
from . import attention
from .data import CalibrationTokens
from .forward import forward_rows
from .skeleton import Skeleton
from .store import HiddenStore

# In-memory hidden states saved at most every 10 min: at Mistral-Large dims (24 GiB per GPU, ~12 s to write at
# 2 GB/s; ~9 s per layer on an H200, 88 layers in ~13 min) that is one or two saves, ~3% of the run, and a
# kill loses at most 10 minutes.  0: after every layer; None: never (a killed run calibrates again).
DEFAULT_PERSIST_EVERY_S = 600.0


@dataclass
class CalibrationResult:
    """What calibration measured: ``amax[module] = max |x|`` of its input (a BF16 value, as a float)."""

    amax: dict[str, float]
    tokens_sha256: str
    samples: int
    tokens: int
    seq_len: int
    moe_all_experts: bool
    attn_implementation: str = "eager"
    attention_kernel: str = ""  # which kernels made eager's probabilities on this rank (attention.status())
    spilled: bool = False
    resumed_layers: int = 0   # layers taken from an interrupted run's resume point
    seconds: float = 0.0
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def calibrate_activations(
    checkpoint: str | Path,
    tokens: CalibrationTokens,
    targets: set[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    device: str | torch.device = "cpu",
    host_budget_bytes: int = 32 << 30,
    work_dir: str | Path | None = None,
    moe_all_experts: bool = True,
    attn_implementation: str = "eager",
    progress: bool = False,
    persist_every_s: float | None = DEFAULT_PERSIST_EVERY_S,
) -> CalibrationResult:
    """Measure the input amax of every module in ``targets`` (checkpoint module names, e.g.
    ``model.layers.0.self_attn.q_proj``) over ``tokens``.  Called on every rank of ``process_group``."""
    rank, world = rank_and_world(process_group)
    dev = torch.device(device)
    t0 = time.perf_counter()
    sk = Skeleton(checkpoint, dev, process_group, attn_implementation, moe_all_experts)
    # Before any compute: every target must be an nn.Linear of some layer (names from the meta model).
    covered = set().union(*(sk.linear_names(i) for i in range(sk.num_layers)))
    _refuse_uncovered(targets - covered, checkpoint)
    mine = tokens.shard(rank, world)
    key = {"tokens_sha256": tokens.sha256, "world": world, "rank": rank, "attn": attn_implementation}
    state = _read_state(work_dir, rank, key)
    # Resume only where every rank stands at the same finished layer.
    first = {s["layer"] if s else None for s in all_gather_object(state, process_group)}
    state = state if len(first) == 1 and None not in first else None
    saved = Path(work_dir, f"hidden-rank{rank}-saved.bin") if work_dir is not None else None
    from_file = state is not None and state["src"] == "saved"
    with every_rank_raises(process_group):  # a rank's own files (spill, saved states): it alone may fail
        store = HiddenStore([int(tokens.samples[j].numel()) for j in mine], sk.hidden_size,
                            budget_bytes=host_budget_bytes, work_dir=work_dir, pin=dev.type == "cuda",
                            tag=f"rank{rank}", resume_src=state["src"] if state and not from_file else None)
        if from_file:
            store.load(saved)
    state = state if all_gather_object(store.resumed or not state, process_group).count(True) == world else None
    amax: dict[str, float] = dict(state["amax"]) if state else {}
    start = state["layer"] + 1 if state else 0
    if start == 0:
        with torch.no_grad(), every_rank_raises(process_group):
            for k, j in enumerate(mine):
                store.write(k, sk.embed(tokens.samples[j]))
            store.advance()
    elif progress and rank == 0:
        print(f"calibrate: resuming after layer {start}/{sk.num_layers} (hidden states from {work_dir})", flush=True)
    layers: list[dict[str, Any]] = list(state.get("layers", [])) if state else []
    last_saved = time.monotonic()
    try:  # the next layer's prefetch stops with the run, also a failed one
        for i in range(start, sk.num_layers):
            stats = _run_layer(sk, i, store, targets, amax, process_group, dev)
            layers.append(stats)
            # Asked on every rank, spilled or not (a rank spills when its own rows pass the budget, so some
            # may and some not): a collective only some ranks enter would leave them waiting.
            due = saved is not None and persist_every_s is not None and i + 1 < sk.num_layers and any(
                all_gather_object(time.monotonic() - last_saved >= persist_every_s, process_group))
            with every_rank_raises(process_group):
                if store.spilled:  # its files are the state: synced and recorded after every layer
                    store.sync()
                    _write_state(work_dir, rank,
                                 {**key, "layer": i, "src": store.src_index, "amax": amax, "layers": layers})
                elif due:  # every in-memory rank saves at the same layer (the resume needs one layer)
                    store.save(saved)
                    _write_state(work_dir, rank,
                                 {**key, "layer": i, "src": "saved", "amax": amax, "layers": layers})
            if due:
                last_saved = time.monotonic()
            if progress and rank == 0:
                print(_line(stats, sk.num_layers, tokens.num_tokens), flush=True)
    finally:
        sk.stop_prefetch()
    store.close()  # only after success: a failed run keeps its spill files and state for the resume
    if work_dir is not None:
        Path(work_dir, f"state-rank{rank}.json").unlink(missing_ok=True)
        saved.unlink(missing_ok=True)
    _refuse_uncovered(targets - set(amax), checkpoint)
    return CalibrationResult(amax=dict(sorted(amax.items())), tokens_sha256=tokens.sha256,
                             samples=len(tokens.samples), tokens=tokens.num_tokens, seq_len=tokens.seq_len,
                             moe_all_experts=moe_all_experts, attn_implementation=attn_implementation,
                             attention_kernel=attention.status(attn_implementation), spilled=store.spilled,
                             resumed_layers=start,
                             seconds=time.perf_counter() - t0, layers=layers)


def _read_state(work_dir, rank: int, key: dict) -> dict | None:
    if work_dir is None:
        return None
    try:
        s = json.loads(Path(work_dir, f"state-rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None
    return s if all(s.get(k) == v for k, v in key.items()) else None


def _write_state(work_dir, rank: int, state: dict) -> None:
    p = Path(work_dir, f"state-rank{rank}.json")
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, p)


def _refuse_uncovered(missing: set[str], checkpoint) -> None:
    if missing:
        m = sorted(missing)
        raise CheckpointError(f"{len(m)} quantized Linear(s) would get no activation scale (examples={m[:3]})",
                              file=str(checkpoint), tensor=m[0],
                              expected="every NVFP4 Linear an nn.Linear of the transformers model (fused MoE "
                              "experts are not calibrated yet)",
                              fix="convert without calibration for weight-only NVFP4A16, or add the modules to "
                              "output.ignore; docs/calibration.md lists the supported families")


@torch.no_grad()  # autograd would keep every activation of a sample: 22 GiB at 123B dims, seq 2048 (H200)
def _run_layer(sk: Skeleton, i: int, store: HiddenStore, targets: set[str], amax: dict[str, float],
               group, dev: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    with MemoryMonitor(dev if dev.type == "cuda" else None) as mem:
        layer = sk.fill_layer(i)  # collective; a failure there is raised on every rank by the loader
        t_fill = time.perf_counter() - t0
        linears = {n: m for n, m in sk.linear_names(i).items() if n in targets}
        names = sorted(linears)
        running = torch.zeros(len(names), dtype=torch.bfloat16, device=dev)
        with every_rank_raises(group):  # this rank's rows: it alone may fail (memory, its spill files)
            hooks = [linears[n].register_forward_pre_hook(_hook(running, k)) for k, n in enumerate(names)]
            try:
                forward_rows(layer, store, sk.layer_kwargs, dev)
            finally:
                for h in hooks:
                    h.remove()
            store.advance()
            sk.free_layer(i)
        red = running.float()  # BF16 values are exact in fp32; gloo cannot reduce BF16 with MAX
        if is_dist(group):
            red = red.to(collective_device(group))
            dist.all_reduce(red, op=dist.ReduceOp.MAX, group=group)
        vals = red.cpu().tolist()
    for n, v in zip(names, vals):
        amax[n] = v
    return {"layer": i, "linears": len(names), "seconds": time.perf_counter() - t0, "fill_s": t_fill,
            "amax_min": min(vals) if vals else None, "amax_max": max(vals) if vals else None,
            "peak_host_bytes": mem.peak_host, "peak_gpu_bytes": mem.peak_gpu if dev.type == "cuda" else None,
            # Pinned (page-locked) host memory is not in RssAnon, which the host peak samples: said apart.
            "hidden_host_bytes": 0 if store.spilled else store.nbytes}


def _hook(running: torch.Tensor, k: int):
    def pre(_mod, args):
        x = args[0]
        if x.numel() == 0:  # an expert no token was routed to (ModelOpt's rule): nothing to measure
            return
        # max |x| in one pass (abs().amax() wrote |x| out first: 117 MiB per row at a 123B down_proj input);
        # the inf-norm is a max, exact in any dtype, so the same bits.
        running[k] = torch.maximum(running[k], torch.linalg.vector_norm(x.detach(), float("inf")).to(running.dtype))

    return pre


def _line(s: dict[str, Any], n: int, tokens: int) -> str:
    gpu = f", GPU peak {s['peak_gpu_bytes'] / 2**30:.2f} GiB" if s["peak_gpu_bytes"] is not None else ""
    rng = f"amax {s['amax_min']:.4g}..{s['amax_max']:.4g}" if s["linears"] else "no quantized Linear"
    return (f"calibrate layer {s['layer'] + 1}/{n}: {s['linears']} Linear(s), {rng}, {s['seconds']:.2f} s "
            f"({tokens / max(s['seconds'], 1e-9):,.0f} tok/s), host peak {s['peak_host_bytes'] / 2**30:.2f} GiB"
            f" + hidden states {s.get('hidden_host_bytes', 0) / 2**30:.2f} GiB{gpu}")
