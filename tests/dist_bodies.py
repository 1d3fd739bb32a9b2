"""Bodies run on every rank of a ProcessGroupPool (gloo, CPU, real DTensors).  Module-level so that the
spawned ranks can import them; each returns plain data the test asserts on."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor import full as dt_full
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import streaming_adapters as sa
from helpers import assert_bit_equal
from reference import reference_state_dict

ROWWISE = re.compile(r"(o_proj|down_proj|\.w2)\.weight$")


def tp_placement(name: str, shape) -> list:
    """Column-parallel Shard(0) / row-parallel Shard(1) as a TP plan would give; vocab-parallel
    embeddings and lm_head; norms, routers and biases replicated."""
    if len(shape) != 2 or "norm" in name or ".mlp.gate." in name:
        return [Replicate()]
    return [Shard(1) if ROWWISE.search(name) else Shard(0)]


def check_local_shards(sd: dict, ref: dict) -> int:
    """Every local shard equals the reference slice at its global offset.  Returns elements checked."""
    n = 0
    for k, v in sd.items():
        want = ref[k].to(v.dtype)
        if isinstance(v, DTensor):
            shape, offset = compute_local_shape_and_global_offset(v.shape, v.device_mesh, v.placements)
            for d, (o, s) in enumerate(zip(offset, shape)):
                want = want.narrow(d, o, s)
            got = v.to_local()
        else:
            got = v
        assert_bit_equal(got, want, k)
        n += got.numel()
    return n


def _nan_dtensor(shape, dtype, mesh, placements):
    return dt_full(tuple(shape), float("nan"), dtype=dtype, device_mesh=mesh, placements=placements)


def tp_load(path: str, chunk_bytes: int = 1 << 16, io_backend: str = "mmap", gpu_pipeline=False):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref = reference_state_dict(path)
    sd = {k: _nan_dtensor(v.shape, torch.float32 if v.dtype == torch.float32 else torch.bfloat16, mesh,
                          tp_placement(k, v.shape)) for k, v in ref.items()}
    report = sa.load_fp8_state_dict(sd, path, chunk_bytes=chunk_bytes, io_backend=io_backend,
                                    gpu_pipeline=gpu_pipeline, readers=3)
    checked = check_local_shards(sd, ref)
    # The full tensors agree too (a collective all-gather of every shard).
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            assert_bit_equal(sd[k].full_tensor(), ref[k].to(torch.bfloat16), k)
    return checked, report.summary_line(), report.bytes_read


def tp_matches_torch_quantized_reader(path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref = reference_state_dict(path)
    keys = [k for k, v in ref.items() if v.dtype == torch.bfloat16]
    mk = lambda: {k: _nan_dtensor(ref[k].shape, torch.bfloat16, mesh, tp_placement(k, ref[k].shape)) for k in keys}
    theirs, ours = mk(), mk()
    dcp.load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(path, block_size=128))
    sa.load_fp8_state_dict(ours, path)
    for k in keys:
        assert_bit_equal(ours[k].to_local(), theirs[k].to_local(), k)
    return len(keys)


def fsdp_model_load(path: str):
    """A real transformers model, real FSDP2 fully_shard per layer, loaded from model.state_dict()."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    placements = {str(v.placements) for v in sd.values()}
    report = sa.load_fp8_state_dict(sd, path)
    ref = reference_state_dict(path)
    checked = check_local_shards(sd, ref)
    for name, p in model.named_parameters():  # the parameters themselves hold the values
        assert_bit_equal(p.full_tensor(), ref[name].to(torch.bfloat16), name)
    return checked, sorted(placements), report.quantized


def tp_fsdp_model_load(path: str):
    """TP=2 (parallelize_module) x FSDP=2 (fully_shard) on 4 ranks: FSDP-over-TP gives _StridedShard."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh["tp"], plan)
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    model.to_empty(device="cpu")
    sd = model.state_dict()
    report = sa.load_fp8_state_dict(sd, path)
    ref = reference_state_dict(path)
    checked = check_local_shards(sd, ref)
    placements = sorted({str(v.placements) for v in sd.values()})
    return checked, placements, report.summary_line()


def mesh2d_load(path: str):
    """4 ranks, 2-D mesh, rows over one dim and columns over the other: shards that start inside blocks in
    both dims (DeepSeek-V3 kv_a_proj_with_mqa: 576 rows -> 288; hidden 256 -> 128)."""
    mesh = init_device_mesh("cpu", (2, 2))
    ref = reference_state_dict(path)
    sd = {}
    for k, v in ref.items():
        pl = [Shard(0), Shard(1)] if v.dim() == 2 else [Replicate(), Replicate()]
        sd[k] = _nan_dtensor(v.shape, torch.float32 if v.dtype == torch.float32 else torch.bfloat16, mesh, pl)
    sa.load_fp8_state_dict(sd, path, chunk_bytes=1 << 16)
    return check_local_shards(sd, ref)


def pp_load(path: str):
    """Pipeline stages: rank 0 holds the embedding and layers 0-1, rank 1 layer 2, the norm and lm_head."""
    ref = reference_state_dict(path)
    rank = dist.get_rank()

    def stage(k):
        m = re.search(r"\.layers\.(\d+)\.", k)
        if m:
            return 0 if int(m.group(1)) < 2 else 1
        return 0 if "embed" in k else 1

    sd = {k: torch.full(v.shape, float("nan"), dtype=v.dtype) for k, v in ref.items() if stage(k) == rank}
    report = sa.load_fp8_state_dict(sd, path)
    check_local_shards(sd, ref)
    return sorted(sd), report.tensors


def ep_load(path: str):
    """Experts split across ranks unevenly (5 experts: 3 on rank 0, 2 on rank 1); attention TP-sharded;
    shared experts and routers replicated."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref = reference_state_dict(path)
    rank = dist.get_rank()
    sd = {}
    for k, v in ref.items():
        m = re.search(r"\.experts\.(\d+)\.", k)
        if m:
            if (int(m.group(1)) < 3) == (rank == 0):
                sd[k] = torch.full(v.shape, float("nan"), dtype=torch.bfloat16)
        else:
            sd[k] = _nan_dtensor(v.shape, torch.float32 if v.dtype == torch.float32 else torch.bfloat16, mesh,
                                 tp_placement(k, v.shape))
    report = sa.load_fp8_state_dict(sd, path)
    check_local_shards(sd, ref)
    experts = sorted({int(m.group(1)) for k in sd if (m := re.search(r"\.experts\.(\d+)\.", k))})
    return experts, report.quantized


def expect_error(path: str, keys_by_rank: dict[int, list[str]] | None = None):
    """Load and return (error class, message) as seen on this rank."""
    ref_shapes = {}
    from streaming_adapters.checkpoint import CheckpointIndex

    idx = CheckpointIndex.open(path)
    for k, info in idx.tensors.items():
        ref_shapes[k] = info.shape
    keys = (keys_by_rank or {}).get(dist.get_rank(), None)
    if keys is None:
        keys = [k for k in ref_shapes if k.endswith("proj.weight")]
    sd = {k: torch.full(ref_shapes[k], float("nan"), dtype=torch.bfloat16) for k in keys}
    try:
        sa.load_fp8_state_dict(sd, path)
    except Exception as e:  # noqa: BLE001 -- the test asserts on the class
        return type(e).__name__, str(e), isinstance(e, sa.CheckpointError)
    return None, "", False


def convert(src: str, dst: str, target: str, fmt: str | None, step_bytes: int):
    """convert_checkpoint on every rank of the pool; returns this rank's report numbers."""
    from streaming_adapters.convert import convert_checkpoint

    r = convert_checkpoint(src, dst, target=target, format=fmt, step_bytes=step_bytes, progress=False)
    return r.world_size, r.bytes_read, r.bytes_written, r.steps


def same_tree(a, b) -> None:
    """Every file of two output folders byte-identical (report.json aside)."""
    from pathlib import Path

    a, b = Path(a), Path(b)
    names = sorted(p.name for p in a.iterdir() if p.name != "report.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "report.json"), (names,)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs"
