"""Bodies of the NeMo tests: one ``NeMoAutoModelForCausalLM.from_pretrained`` per call, on every rank of a
pool (or in the test process for single-process cases), checked here against the independent reference.

What a loaded tensor must hold comes from ``reference.reference_state_dict`` (whole tensors, its own
dequantizer) and, for NeMo's grouped-expert layout (DeepSeek-V3: ``experts.gate_and_up_projs [E, H, 2I]``,
``experts.down_projs [E, I, H]``), from this file's own re-layout of the reference's per-expert tensors.  The
local shard of a DTensor is located with torch's own DTensor geometry.  Logits (or, under pipeline
parallelism, the schedule's loss) are compared with a NeMo load of a BF16 copy of the reference written with
``safetensors.save_file`` (:func:`bf16_copy`), never with this package's converter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from reference import reference_state_dict
from safetensors.torch import load_file, save_file

VOCAB = 1001
TOKENS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
MiB = 1 << 20

# NeMo's own ``distributed:`` sections (recipes/_dist_utils.create_distributed_setup_from_config).
LAYOUTS = {
    "fsdp2": {"strategy": "fsdp2", "dp_size": 2},
    "tp2": {"strategy": "fsdp2", "tp_size": 2},
    "pp2": {"strategy": "fsdp2", "pp_size": 2, "pipeline": {"pp_microbatch_size": 1, "pp_batch_size": 2}},
    "ep2": {"strategy": "fsdp2", "ep_size": 2},
}


# -- checkpoints ------------------------------------------------------------------------------------------
def bf16_copy(path: str | Path) -> Path:
    """The reference weights as a BF16 checkpoint next to the FP8 one (written once, by rank 0 of a pool or
    the test process): ``save_file(reference_state_dict(path))`` + config.json without quantization_config."""
    path = Path(path)
    dst = path.parent / (path.name + "-bf16")
    if not (dst / "config.json").exists():
        tmp = path.parent / (path.name + f"-bf16.tmp{os.getpid()}")
        tmp.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in reference_state_dict(path).items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        try:
            tmp.rename(dst)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return dst


def raw_codes(path: str | Path) -> dict[str, torch.Tensor]:
    """Every FP8 tensor of the checkpoint as stored (for the mis-load signature: codes cast to BF16)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v for k, v in load_file(f).items() if v.dtype == torch.float8_e4m3fn})
    return out


def _expert(ref, prefix: str, e: int, proj: str) -> torch.Tensor | None:
    """Expert ``e``'s ``proj`` (gate/up/down) under ``prefix`` (``model.layers.1``), in either on-disk layout."""
    names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}[proj]
    for module, name in ((".mlp", names[0]), (".block_sparse_moe", names[1])):
        key = f"{prefix}{module}.experts.{e}.{name}.weight"
        if key in ref:
            return ref[key]
    return None


def expected(ref: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The full tensor model key ``key`` must hold.  Fused experts are assembled here from the reference's
    per-expert tensors: NeMo's grouped layout (``gate_and_up_projs [E, H, 2I]`` = [gate^T | up^T],
    ``down_projs [E, I, H]`` = down^T) and transformers 5's (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)."""
    m = re.match(r"^(.*)\.mlp\.experts\.(gate_and_up_projs|down_projs|gate_up_proj|down_proj)$", key)
    if m:
        prefix, which = m.groups()
        n = 0
        while _expert(ref, prefix, n, "down") is not None:
            n += 1
        if which == "down_projs":
            return torch.stack([_expert(ref, prefix, e, "down").T for e in range(n)])
        if which == "down_proj":
            return torch.stack([_expert(ref, prefix, e, "down") for e in range(n)])
        pairs = [(_expert(ref, prefix, e, "gate"), _expert(ref, prefix, e, "up")) for e in range(n)]
        if which == "gate_and_up_projs":
            return torch.stack([torch.cat([g.T, u.T], 1) for g, u in pairs])
        return torch.stack([torch.cat([g, u], 0) for g, u in pairs])
    if key.endswith("lm_head.weight") and key not in ref:  # a tied checkpoint: the head is the embeddings
        return ref.get(key.replace("lm_head.weight", "model.embed_tokens.weight"))
    if key not in ref and key.endswith(".mlp.gate.weight"):  # Mixtral's router on disk
        return ref.get(key.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight"))
    return ref.get(key)


def local_box(value: torch.Tensor):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(value, DTensor):
        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), tuple(offset)
    return value, (0,) * value.ndim


def narrow_to(full: torch.Tensor, offset, shape) -> torch.Tensor:
    for d, (o, n) in enumerate(zip(offset, shape)):
        full = full.narrow(d, o, n)
    return full


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a) if a.is_floating_point() else None
    if nan is not None and not torch.equal(nan, torch.isnan(b)):
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(a.dtype)
    if view is None:
        return torch.equal(a, b)
    a, b = a.contiguous().view(view), b.contiguous().view(view)
    return torch.equal(a[~nan], b[~nan]) if nan is not None else torch.equal(a, b)


# -- one load ---------------------------------------------------------------------------------------------
def setup_nemo(hook: bool) -> None:
    """Import NeMo, apply the CPU shim (no-op with CUDA), and install or remove the hook."""
    import cpu_shim
    from nemo_automodel import NeMoAutoModelForCausalLM  # noqa: F401

    cpu_shim.install()
    import streaming_adapters.integrations.nemo as hook_module

    hook_module.install() if hook else hook_module.uninstall()


def distributed_setup(layout: str | None):
    if layout is None:
        return {}
    import torch.distributed as dist
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
    from nemo_automodel.recipes._dist_utils import create_distributed_setup_from_config

    setup = create_distributed_setup_from_config(dict(LAYOUTS[layout]), world_size=dist.get_world_size())
    if setup.pipeline_config is not None:
        setup.pipeline_config.loss_fn = MaskedCrossEntropy()  # what train_ft.py does before building
    return {"distributed_setup": setup}


def from_pretrained(path, layout: str | None, *, hook: bool, peft: bool = False, **kwargs):
    from nemo_automodel import NeMoAutoModelForCausalLM

    setup_nemo(hook)
    if peft:
        from nemo_automodel.components._peft.lora import PeftConfig

        kwargs["peft_config"] = PeftConfig(target_modules=["*_proj"], dim=4, alpha=8)
    return NeMoAutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.bfloat16, attn_implementation="sdpa",
                                                    **distributed_setup(layout), **kwargs)


def model_parts(model) -> list:
    return list(model.parts) if hasattr(model, "info") else [model]


def check_params(model, path) -> dict:
    """Every local shard vs the reference: keys equal to it, keys holding the FP8 codes cast to BF16 (NeMo's
    mis-load signature), and keys wrong otherwise."""
    ref = reference_state_dict(path)
    codes = raw_codes(path)
    out = {"checked": 0, "quantized": 0, "exact": [], "codes": [], "wrong": [], "lora": 0}
    for part in model_parts(model):
        for key, value in part.state_dict().items():
            if "lora_" in key:
                out["lora"] += 1
                continue
            full = expected(ref, key)
            if full is None:
                out["wrong"].append(f"{key}: no reference")
                continue
            local, offset = local_box(value)
            want = narrow_to(full.to(local.dtype), offset, local.shape)
            out["checked"] += 1
            out["quantized"] += key in codes
            if same_bits(local, want):
                out["exact"].append(key)
            elif key in codes and same_bits(local, narrow_to(codes[key].to(local.dtype), offset, local.shape)):
                out["codes"].append(key)
            else:
                out["wrong"].append(key)
    return out


def forward(model, layout: str | None):
    """Logits for TOKENS (a full tensor on every rank), or the pipeline schedule's per-microbatch losses on
    the last stage (None elsewhere)."""
    from torch.distributed.tensor import DTensor

    device = next(p for part in model_parts(model) for p in part.parameters()).device
    tokens = TOKENS.to(device if device.type != "meta" else "cpu")
    with torch.no_grad():
        if hasattr(model, "info"):  # NeMo's AutoPipeline
            model.update_seq_len(tokens.shape[1])
            last = model.info.has_last_stage
            losses = [] if last else None
            args = (tokens,) if model.info.has_first_stage else ()
            model.info.schedule.eval(*args, target=tokens.clone() if last else None, losses=losses)
            return torch.stack([x.detach().float().cpu() for x in losses]) if last else None
        out = model(input_ids=tokens)
        logits = out.logits if hasattr(out, "logits") else out
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        return logits.detach().cpu()


def load_and_check(path, layout: str | None = None, *, hook: bool, peft: bool = False, logits: bool = True) -> dict:
    """One load on this rank: class, adapter stats, parameter check, logits, time marks."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    setup_nemo(hook)
    t0 = time.monotonic()
    model = from_pretrained(path, layout, hook=hook, peft=peft)
    t1 = time.monotonic()
    adapter = getattr(model_parts(model)[0], "state_dict_adapter", None)
    stats = getattr(adapter, "sa_last_load", None)
    result = {
        "rank": rank, "seconds": t1 - t0, "t0": t0, "t1": t1,
        "class": type(model_parts(model)[0]).__name__,
        "streaming_class": hasattr(type(model_parts(model)[0]), "_streaming_adapters_base"),
        "adapter": type(adapter).__name__ if adapter is not None else None,
        "stats": None if stats is None else {k: v for k, v in vars(stats).items() if k != "ranks"},
        "params": check_params(model, path),
        "out": forward(model, layout) if logits else None,
    }
    del model
    return result


def load_error(path, layout: str | None) -> tuple[str | None, str]:
    """``from_pretrained`` with the hook, expected to fail: (exception class name, message) on this rank."""
    try:
        from_pretrained(path, layout, hook=True)
    except Exception as e:  # noqa: BLE001 -- the test compares what each rank raised
        return type(e).__name__, str(e)
    return None, ""


# -- memory ---------------------------------------------------------------------------------------------
def memory_body(path, layout: str, hook: bool) -> dict:
    """A load with monotonic marks (sampled from outside), the local shard's bytes and the whole model's."""
    from torch.distributed.tensor import DTensor

    setup_nemo(hook)
    import gc

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu0 = torch.cuda.memory_allocated()
    t0 = time.monotonic()
    model = from_pretrained(path, layout, hook=hook)
    t1 = time.monotonic()
    shard = full = 0
    for part in model_parts(model):
        for v in part.state_dict().values():
            local = v.to_local() if isinstance(v, DTensor) else v
            shard += local.numel() * local.element_size()
            full += v.numel() * v.element_size()
    adapter = getattr(model_parts(model)[0], "state_dict_adapter", None)
    stats = getattr(adapter, "sa_last_load", None)
    out = {"t0": t0, "t1": t1, "shard": shard, "full": full, "seconds": t1 - t0,
           "temporary": stats.peak_temporary_bytes if stats is not None else None,
           "parts": stats.parts if stats is not None else None}
    if cuda:
        torch.cuda.synchronize()
        out["gpu_peak"] = torch.cuda.max_memory_allocated() - gpu0
    del model
    gc.collect()
    return out


def measure_peak(path: str, hook: bool, warmup: str, layout: str = "fsdp2", timeout_s: float = 300) -> list[dict]:
    """Run in the parent (test process or benchmark), not on a rank: one load per fresh pair of ranks (nothing
    of an earlier model can be freed during it) after a warm-up load of ``warmup`` (imports and first-call
    caches stay outside the measurement); per rank :func:`memory_body`'s dict plus ``peak`` / ``end`` RssAnon
    over its value at the load's start, sampled every 2 ms from this process, and the ``samples`` count."""
    from streaming_adapters.testing.dist_pool import ProcessGroupPool
    from streaming_adapters.testing.rss import RssSampler

    # glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MiB) in the heap, where they stay
    # in RssAnon: a fixed 1 MiB threshold makes RssAnon follow live allocations.  glibc reads it at process
    # start, so it must be in the environment the workers are spawned with.
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 * MiB)
    try:
        pool = ProcessGroupPool(2, timeout_s=timeout_s)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_") if old is None else os.environ.update(MALLOC_MMAP_THRESHOLD_=old)
    try:
        pool.run(memory_body, warmup, layout, hook)
        with RssSampler(pool.pids, interval_s=0.002) as rss:
            results = pool.run(memory_body, path, layout, hook)
        rows = []
        for pid, r in zip(pool.pids, results):
            base = rss.at(pid, r["t0"])
            rows.append(dict(r, peak=rss.peak(pid, r["t0"], r["t1"]) - base, end=rss.at(pid, r["t1"]) - base,
                             samples=len(rss.window(pid, r["t0"], r["t1"]))))
        return rows
    finally:
        pool.close()
