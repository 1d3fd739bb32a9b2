"""Model-level loading tests: shared helpers and the bodies run on every rank of a ProcessGroupPool.

Everything here that says what a loaded tensor must hold is independent of the package: the reference
is ``reference.reference_state_dict`` (whole tensors, its own dequantizer), model names are mapped to
checkpoint names by this file's own table (``expected_tensor``), fused experts are assembled here by
slicing the reference per expert, and logits come from transformers' own ``from_pretrained`` on a BF16
copy of the reference written with ``safetensors.save_file``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import streaming_adapters as sa
from helpers import assert_bit_equal
from reference import reference_state_dict

TOKENS = torch.randint(0, 1001, (2, 6), generator=torch.Generator().manual_seed(0))


# -- models --------------------------------------------------------------------------------------------
def config_of(path):
    """The fixture's config, without its quantization_config (the model holds BF16)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    return cfg


def is_vlm(cfg) -> bool:
    return getattr(cfg, "vision_config", None) is not None


def model_kwargs(cfg) -> dict:
    """torch's CPU grouped_mm wants 16-byte strides: expert widths that are not a multiple of 8 (the
    straddle test's 97) run transformers' eager experts, in the loaded and the reference model alike."""
    return {"experts_implementation": "eager"} if getattr(cfg, "moe_intermediate_size", 8) % 8 else {}


def meta_model(path):
    """The real transformers class of the checkpoint, built on the meta device in BF16."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = config_of(path)
    auto = AutoModelForImageTextToText if is_vlm(cfg) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(cfg, dtype=torch.bfloat16, **model_kwargs(cfg))


def decoder(model) -> nn.Module:
    """The module holding ``layers``, ``embed_tokens``, ``norm`` (text model of a VLM too)."""
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def init_rotary(model) -> None:
    """Non-persistent buffers are in no checkpoint: after ``to_empty`` rotary ``inv_freq`` holds garbage.
    Recompute them with transformers' own initializer."""
    for mod in model.modules():
        if "RotaryEmbedding" in type(mod).__name__ and hasattr(mod, "original_inv_freq"):
            model._init_weights(mod)


def materialize(model, tie: bool = False) -> None:
    model.to_empty(device="cpu")
    init_rotary(model)
    if tie:
        model.tie_weights()  # plain to_empty makes new Parameters per module: ties break


# -- the expected values (independent of the package) ---------------------------------------------------
_VLM_OLD = [(r"^model\.language_model\.", "language_model.model."), (r"^model\.vision_tower\.", "vision_tower."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^lm_head\.", "language_model.lm_head.")]
_TORCHTITAN = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
               "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def checkpoint_names(key: str) -> list[str]:
    """Names a model tensor may have on disk: itself, the old VLM layout, Mixtral's block_sparse_moe,
    torchtitan's names, and the embeddings for a tied lm_head."""
    out = [key]
    for pat, rep in _VLM_OLD:
        if re.match(pat, key):
            out.append(re.sub(pat, rep, key))
    if key.startswith("model.") and not key.startswith("model.language_model."):  # text model, VLM checkpoint
        out += ["model.language_model." + key[6:], "language_model.model." + key[6:]]
    if key == "lm_head.weight":
        out.append("language_model.lm_head.weight")
    out.append(key.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight"))
    m = re.match(r"^(?:layers\.(\d+)\.)?(.+)\.(weight)$", key)
    if m and m.group(2) in _TORCHTITAN:
        mid = _TORCHTITAN[m.group(2)]
        out.append(f"model.layers.{m.group(1)}.{mid}.weight" if m.group(1) else f"{mid}.weight")
    if key.endswith("lm_head.weight"):
        out += ["model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                "language_model.model.embed_tokens.weight"]
    return out


def expected_tensor(ref: dict, key: str) -> torch.Tensor:
    """The full tensor a model key must hold, from the reference state dict."""
    m = re.match(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
    if m:
        prefix, which = m.groups()
        names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}

        def expert(e: int, proj: str) -> torch.Tensor | None:
            for mod, name in ((".mlp", names[proj][0]), (".block_sparse_moe", names[proj][1])):
                k = f"{prefix}{mod}.experts.{e}.{name}.weight"
                if k in ref:
                    return ref[k]
            return None

        n = 0
        while expert(n, "down") is not None:
            n += 1
        if which == "down_proj":
            h, i = expert(0, "down").shape
            out = torch.empty(n, h, i, dtype=torch.bfloat16)
            for e in range(n):
                out[e] = expert(e, "down")
            return out
        i, h = expert(0, "gate").shape
        out = torch.empty(n, 2 * i, h, dtype=torch.bfloat16)
        for e in range(n):
            out[e, :i] = expert(e, "gate")   # gate rows first, then up (transformers 5 fused layout)
            out[e, i:] = expert(e, "up")
        return out
    for name in checkpoint_names(key):
        if name in ref:
            return ref[name]
    raise KeyError(f"test table has no checkpoint name for {key}")


def global_box(value, key: str, expert_range=None):
    """(local tensor, global offset) of a model tensor, from torch's own DTensor geometry."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(value, DTensor):
        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), tuple(offset)
    if expert_range is not None and re.search(r"\.experts\.(gate_up_proj|down_proj)$", key):
        return value, (expert_range[0],) + (0,) * (value.ndim - 1)
    return value, (0,) * value.ndim


def check_loaded(model, path, expert_range=None) -> int:
    """Every local shard of every model tensor equals the expected slice, bit for bit.  Returns the
    number of elements checked on this rank."""
    ref = reference_state_dict(path)
    n = 0
    for key, value in model.state_dict().items():
        local, offset = global_box(value, key, expert_range)
        want = expected_tensor(ref, key).to(value.dtype)
        for d, o in enumerate(offset):
            want = want.narrow(d, o, local.shape[d])
        assert_bit_equal(local, want, key)
        n += local.numel()
    return n


def checked_everywhere(model, path, expert_range=None) -> int:
    """check_loaded on every rank, agreed on: a rank whose check fails makes every rank fail now, not
    hang later in the gather's collectives until the group's timeout."""
    error = None
    try:
        n = check_loaded(model, path, expert_range)
    except AssertionError as e:
        error, n = e, 0
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, None if error is None else str(error)[:500])
    if error is not None:
        raise error
    if any(seen):
        raise AssertionError(f"rank {next(r for r, e in enumerate(seen) if e)} failed: {next(e for e in seen if e)}")
    return n


def bf16_copy(path) -> Path:
    """A BF16 checkpoint of the reference weights next to the FP8 one (written once): safetensors.save_file
    of reference_state_dict + the fixture's config.json without quantization_config."""
    path = Path(path)
    dst = path.parent / (path.name + "-bf16ref")
    if not (dst / "config.json").exists():
        dst.mkdir(exist_ok=True)
        ref = {k: v.contiguous() for k, v in reference_state_dict(path).items()}
        save_file(ref, dst / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (dst / "config.json.tmp").write_text(json.dumps(cfg, indent=2))
        (dst / "config.json.tmp").rename(dst / "config.json")
    return dst


def reference_logits(bf16_dir) -> torch.Tensor:
    """Logits of the BF16 reference loaded by transformers' from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = config_of(bf16_dir)
    auto = AutoModelForImageTextToText if is_vlm(cfg) else AutoModelForCausalLM
    model = auto.from_pretrained(bf16_dir, dtype=torch.bfloat16, **model_kwargs(cfg)).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def check_logits_of_full(path, full: dict) -> tuple[int, ...]:
    """Build the whole model from ``full`` (a gathered state dict), run it, compare with from_pretrained."""
    model = meta_model(path)
    materialize(model)
    model.load_state_dict(full, strict=True)
    got = logits(model)
    assert_bit_equal(got, reference_logits(bf16_copy(path)), "logits")
    return tuple(got.shape)


# -- layouts ---------------------------------------------------------------------------------------------
def world_mesh(*shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape or (dist.get_world_size(),), mesh_dim_names=names)


def fsdp2(model, mesh) -> None:
    """Real FSDP2 through the library's ``fully_shard_layers``: fully_shard per decoder layer (and the
    vision tower), then the root; F32 submodules (DeepSeek-V3's router under transformers >= 5.2x) become
    units of their own first."""
    layers = list(decoder(model).layers)
    if hasattr(model.model, "vision_tower"):
        layers.append(model.model.vision_tower)
    sa.fully_shard_layers(model, mesh, layers=layers)


def tensor_parallel(model, mesh) -> None:
    """Real parallelize_module: Colwise q/k/v, gate/up (dense and shared experts), Rowwise o/down,
    vocab-parallel embeddings and lm_head; fused experts Shard(1) of gate_up_proj [E, 2I, H] and
    Shard(2) of down_proj [E, H, I] (no torch style exists for them: distribute_tensor on meta)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"q_proj": ColwiseParallel, "k_proj": ColwiseParallel, "v_proj": ColwiseParallel,
              "o_proj": RowwiseParallel, "gate_proj": ColwiseParallel, "up_proj": ColwiseParallel,
              "down_proj": RowwiseParallel}
    dec = decoder(model)
    for layer in dec.layers:
        plan = {name: styles[name.rsplit(".", 1)[-1]]() for name, mod in layer.named_modules()
                if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in styles}
        parallelize_module(layer, mesh, plan)
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            experts.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj, mesh, [Shard(1)]))
            experts.down_proj = nn.Parameter(distribute_tensor(experts.down_proj, mesh, [Shard(2)]))
    parallelize_module(dec, mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate())})
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})


def expert_parallel_dtensor(model, mesh) -> None:
    """EP: fused experts DTensor Shard(0) over the "ep" mesh (5 experts -> 3 + 2)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for layer in decoder(model).layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(experts, name)
                setattr(experts, name, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))


def expert_parallel_plain(model, rank: int, world: int) -> tuple[int, int]:
    """EP without DTensors: each rank's fused experts are plain tensors of a contiguous range (5 experts:
    rank 0 holds 0-1, rank 1 holds 2-4).  Returns (first, num_experts)."""
    first = total = 0
    for layer in decoder(model).layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        total = experts.gate_up_proj.shape[0]
        bounds = [total * r // world for r in range(world + 1)]
        first, stop = bounds[rank], bounds[rank + 1]
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            setattr(experts, name, nn.Parameter(torch.empty((stop - first, *p.shape[1:]), dtype=p.dtype,
                                                            device="meta")))
    return first, total


def pipeline_stage(model, stage: int, split: int) -> list[str]:
    """PP: keep layers [0, split) on stage 0 and [split, n) on stage 1, as an nn.ModuleDict keyed by the
    original indices (so names stay model.layers.<i>.*); embeddings on stage 0, norm + lm_head on 1."""
    dec = decoder(model)
    n = len(dec.layers)
    keep = range(0, split) if stage == 0 else range(split, n)
    dec.layers = nn.ModuleDict({str(i): dec.layers[i] for i in keep})
    if stage == 0:
        dec.norm = None
        model.lm_head = None
    else:
        dec.embed_tokens = None
    return [str(i) for i in keep]


# -- gathering for the logits of sharded layouts -------------------------------------------------------
def gather_full(model, expert_range=None, stages: bool = False) -> dict | None:
    """The whole state dict on rank 0 (None elsewhere).  DTensors by full_tensor (a collective on every
    rank); plain expert ranges (``expert_range``) and pipeline stages (``stages``: each rank holds
    different keys) by all_gather_object; other plain tensors are replicated and taken from rank 0."""
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    full, send = {}, {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            full[key] = value.full_tensor()
        elif stages or (expert_range is not None and re.search(r"\.experts\.(gate_up_proj|down_proj)$", key)):
            send[key] = value
        else:
            full[key] = value
    pieces: list = [None] * world
    dist.all_gather_object(pieces, send)
    if rank != 0:
        return None
    if stages:
        return {k: v for p in pieces for k, v in p.items()}
    for key in send:
        full[key] = torch.cat([p[key] for p in pieces])
    return full


# -- bodies ----------------------------------------------------------------------------------------------
def fsdp2_body(path: str, tie: bool = False):
    """Real FSDP2 over all ranks, real sharded forward: logits bit-equal to from_pretrained's."""
    mesh = world_mesh()
    model = meta_model(path)
    fsdp2(model, mesh)
    materialize(model)
    tied = model.lm_head.weight is decoder(model).embed_tokens.weight
    report = sa.load_fp8_checkpoint(model, path, device_mesh=mesh)
    checked = checked_everywhere(model, path)
    got = logits(model)
    assert_bit_equal(got, reference_logits(bf16_copy(path)), "logits")
    placements = sorted({str(v.placements) for v in model.state_dict().values() if hasattr(v, "placements")})
    from torch.distributed.fsdp import FSDPModule

    f32_units = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)
                       and any(p.dtype == torch.float32 for p in m.parameters(recurse=False)))
    return dict(checked=checked, groups=report.groups, placements=placements, tied=tied, f32_units=f32_units,
                quantized=report.quantized, missing=report.missing, unexpected=report.unexpected)


def tp_body(path: str):
    """Real parallelize_module TP over all ranks.  The tiny configs have 5 heads and 1 KV head (no even
    head split), so the logits come from the loaded shards gathered (full_tensor) into a plain model
    on rank 0, not from a sharded forward."""
    mesh = world_mesh()
    model = meta_model(path)
    tensor_parallel(model, mesh)
    materialize(model)
    report = sa.load_fp8_checkpoint(model, path, device_mesh=mesh)
    checked = checked_everywhere(model, path)
    boxes = {}  # key -> (first row, end row, rows in the tensor) of this rank's shard, along the TP dim
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "embed_tokens.weight", "lm_head.weight", "q_proj.weight")):
            local, off = global_box(v, k)
            d = 1 if k.endswith("gate_up_proj") else 0
            boxes[k] = (off[d], off[d] + local.shape[d], v.shape[d])
    full = gather_full(model)
    out = check_logits_of_full(path, full) if full is not None else None
    return dict(checked=checked, boxes=boxes, logits=out, groups=report.groups, requests=report.requests)


def tp_fsdp_body(path: str, tp: int = 2):
    """TP (parallelize_module) x FSDP2 (fully_shard over dp): FSDP-over-TP gives _StridedShard.  Logits
    from the gathered shards (full_tensor) on rank 0."""
    world = dist.get_world_size()
    mesh = world_mesh(world // tp, tp, names=("dp", "tp"))
    model = meta_model(path)
    tensor_parallel(model, mesh["tp"])
    fsdp2(model, mesh["dp"])
    materialize(model)
    report = sa.load_fp8_checkpoint(model, path, device_mesh=mesh)
    checked = checked_everywhere(model, path)
    placements = sorted({str(v.placements) for v in model.state_dict().values() if hasattr(v, "placements")})
    full = gather_full(model)
    out = check_logits_of_full(path, full) if full is not None else None
    return dict(checked=checked, placements=placements, logits=out, line=report.summary_line())


def pp_body(path: str, split: int = 2):
    """PP=2: stage 0 holds layers 0..split-1 + embeddings, stage 1 the rest + norm + lm_head (2 and 3 of
    5 layers: different numbers of groups).  Logits: the stages' loaded tensors are gathered to rank 0
    and the full model runs there (there is no pipeline schedule on CPU here)."""
    rank = dist.get_rank()
    model = meta_model(path)
    kept = pipeline_stage(model, rank, split)
    materialize(model)
    report = sa.load_fp8_checkpoint(model, path)
    checked = checked_everywhere(model, path)
    full = gather_full(model, stages=True)
    out = check_logits_of_full(path, full) if full is not None else None
    return dict(checked=checked, layers=kept, groups=report.groups, logits=out, keys=len(model.state_dict()))


def ep_dtensor_body(path: str):
    """EP=2 with DTensor Shard(0) experts over an "ep" mesh; the rest replicated plain tensors.  Logits
    from the gathered experts (full_tensor) on rank 0."""
    mesh = world_mesh(names=("ep",))
    model = meta_model(path)
    expert_parallel_dtensor(model, mesh)
    materialize(model)
    report = sa.load_fp8_checkpoint(model, path, device_mesh=mesh)
    checked = checked_everywhere(model, path)
    local = sorted({v.to_local().shape[0] for k, v in model.state_dict().items() if k.endswith("gate_up_proj")})
    full = gather_full(model)
    out = check_logits_of_full(path, full) if full is not None else None
    return dict(checked=checked, local_experts=local, logits=out, quantized=report.quantized)


def ep_plain_body(path: str):
    """EP=2 with plain tensors holding a contiguous range of experts (``expert_range``).  Logits from
    the experts gathered (all_gather_object) to rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = meta_model(path)
    er = expert_parallel_plain(model, rank, world)
    materialize(model)
    report = sa.load_fp8_checkpoint(model, path, expert_range=er)
    checked = checked_everywhere(model, path, expert_range=er)
    full = gather_full(model, expert_range=er)
    out = check_logits_of_full(path, full) if full is not None else None
    return dict(checked=checked, expert_range=er, logits=out, quantized=report.quantized)


def error_body(path: str, extra: dict[int, tuple[str, tuple[int, ...]]] | None = None, strict: bool = True):
    """FSDP2 Llama with an extra parameter on some ranks (``{rank: (name, shape)}``); returns what this
    rank saw: (error class, message) or the report's missing / unexpected."""
    mesh = world_mesh()
    model = meta_model(path)
    name_shape = (extra or {}).get(dist.get_rank())
    if name_shape is not None:
        mod_name, _, leaf = name_shape[0].rpartition(".")
        model.get_submodule(mod_name).register_parameter(leaf, nn.Parameter(torch.empty(name_shape[1],
                                                                                         device="meta")))
    fsdp2(model, mesh)
    materialize(model)
    try:
        report = sa.load_fp8_checkpoint(model, path, strict=strict)
    except Exception as e:  # noqa: BLE001 -- the test asserts on the class and message
        return dict(error=type(e).__name__, message=str(e), ours=isinstance(e, sa.CheckpointError))
    check_loaded_known(model, path)
    return dict(error=None, missing=report.missing, unexpected=report.unexpected)


def check_loaded_known(model, path) -> None:
    """check_loaded for the tensors the test table knows (an error test adds unknown ones)."""
    ref = reference_state_dict(path)
    for key, value in model.state_dict().items():
        try:
            want = expected_tensor(ref, key)
        except KeyError:
            continue
        local, offset = global_box(value, key)
        want = want.to(value.dtype)
        for d, o in enumerate(offset):
            want = want.narrow(d, o, local.shape[d])
        assert_bit_equal(local, want, key)


# -- memory ----------------------------------------------------------------------------------------------
def memory_warmup(path: str) -> None:
    """Imports and first-use allocations (transformers' modeling module, DCP, FSDP) before the measured
    run, so that they are not counted as the load's memory."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    meta_model(path)
    dist.barrier()


def memory_body(path: str):
    """FSDP2 over all ranks, 500M-parameter Llama shape.  Returns time.monotonic() marks for the parent's
    outside sampler, the bytes the bound is made of, and checks a few tensors against the reference
    (after the measured window)."""
    import time

    from reference import reference_tensors
    from streaming_adapters.report import rss_anon_bytes

    dist.barrier()
    t_build = time.monotonic()
    rss_build = rss_anon_bytes()
    mesh = world_mesh()
    model = meta_model(path)
    fsdp2(model, mesh)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    shard = sum(v.to_local().nbytes for v in sd.values())
    group = max(sum(v.to_local().nbytes for k, v in sd.items() if k.startswith(f"model.layers.{i}."))
                for i in range(len(model.model.layers)))
    t_load = time.monotonic()
    report = sa.load_fp8_checkpoint(model, path, device_mesh=mesh)
    t_end = time.monotonic()
    dist.barrier()
    last = len(model.model.layers) - 1
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.post_attention_layernorm.weight"]
    ref = reference_tensors(path, names)
    for name in names:
        local, offset = global_box(sd[name], name)
        assert_bit_equal(local, ref[name].narrow(0, offset[0], local.shape[0]), name)
    return dict(t_build=t_build, t_load=t_load, t_end=t_end, rss_build=rss_build, shard=shard, group=group,
                params=sum(v.numel() for v in sd.values()), seconds=report.seconds,
                inside_peak=report.peak_host_bytes - rss_build, line=report.summary_line())
