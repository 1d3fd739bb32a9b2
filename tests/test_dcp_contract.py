"""The DCP contract with other people's checkpoints, on real files and real gloo ranks.

* ``dcp.load(sd, storage_reader=StreamingFP8StorageReader(A), checkpoint_id=B)`` loads B (DCP calls
  ``reset(B)``), even when B has another format.
* HF safetensors written by torch's own ``HuggingFaceStorageWriter(save_distributed=True)`` -- one tensor's
  shards across files, offsets in ``DCP_SHARDING_INFO`` -- consolidated or not, load bit-exactly into other
  layouts and world sizes (saved at world 2 with uneven and empty shards; loaded at world 1, 2 and 4,
  TP / FSDP / 2-D DTensors).
* ``read_metadata().storage_data`` values are torch's ``_HFStorageInfo`` (a subclass).
* FP8 MoE checkpoints with fused experts and per-expert scales (transformers 5.25's own quantizer writes
  them; Mistral-4 per-expert scales) load bit-exactly, also into TP shards that cut through scale blocks.
* Our errors about the checkpoint reach the caller of plain ``dcp.load`` as ordinary exceptions (damage
  found only while reading bytes is wrapped by DCP's read step; ``load_fp8_state_dict`` unwraps it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
from torch.distributed.checkpoint.api import CheckpointException

import streaming_adapters as sa
from helpers import assert_bit_equal, poisoned_like
from reference import reference_state_dict
from streaming_adapters.checkpoint.index import CheckpointIndex, ShardedTensorInfo
from streaming_adapters.checkpoint.coverage import IncompleteCheckpointError
from streaming_adapters.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationError,
    MissingScaleError,
    ScaleLayoutError,
)
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = [pytest.mark.dist, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


# -- the tensors torch's writer saves at world 2, and the layouts they are loaded into -------------------
def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "tok_embeddings.weight": rnd(37, 16),         # 37 rows: uneven over 2 and 4 ranks
        "layers.0.attention.wq.weight": rnd(24, 16),
        "layers.0.attention.wo.weight": rnd(16, 24),
        "layers.0.feed_forward.w1.weight": rnd(3, 16, dtype=torch.float32),  # 4 ranks: 1, 1, 1, 0 rows
        "layers.0.one_row": rnd(1, 8),                # 2 ranks: rank 1 holds an empty shard
        "norm.weight": rnd(16, dtype=torch.float32),  # replicated: one rank writes it
        "output.bias": rnd(2, 3),                     # a plain tensor (not a DTensor)
        # no integer tensor: torch 2.13's consolidation calls torch.finfo on every dtype (TypeError on I64)
    }


SAVE_LAYOUT = {  # world 2, 1-D mesh
    "tok_embeddings.weight": "S0", "layers.0.attention.wq.weight": "S0", "layers.0.attention.wo.weight": "S1",
    "layers.0.feed_forward.w1.weight": "S0", "layers.0.one_row": "S0", "norm.weight": "R",
}
LOAD_LAYOUT_2 = {  # world 2: every tensor cut the other way (TP column <-> row)
    "tok_embeddings.weight": "S1", "layers.0.attention.wq.weight": "S1", "layers.0.attention.wo.weight": "S0",
    "layers.0.feed_forward.w1.weight": "R", "layers.0.one_row": "S1", "norm.weight": "S0",
}
LOAD_LAYOUT_4 = {  # world 4, 2-D mesh (dp, tp): FSDP over TP, and 1-D over all four (empty shards)
    "tok_embeddings.weight": "S0,S1", "layers.0.attention.wq.weight": "S1,S0",
    "layers.0.attention.wo.weight": "R,S1", "layers.0.feed_forward.w1.weight": "S0/4",
    "layers.0.one_row": "S0,S0", "norm.weight": "S0,R",
}


def _dtensors(layout: dict[str, str], zero: bool) -> dict[str, torch.Tensor]:
    """Every tensor of :func:`full_tensors` as a DTensor of ``layout`` (zeros when ``zero``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
    place = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    out = {}
    for name, t in full_tensors().items():
        spec = layout.get(name)
        src = torch.zeros_like(t) if zero else t
        if spec is None:
            out[name] = src.clone()
        elif "," in spec:
            out[name] = distribute_tensor(src, mesh2, [place[p] for p in spec.split(",")])
        else:
            out[name] = distribute_tensor(src, mesh1, [place[spec.split("/")[0]]])
    return out


def save_body(path: str, consolidate: bool, split_files: bool) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    names = list(full_tensors())
    mapping = {n: 1 + i % 2 for i, n in enumerate(names)} if split_files else None  # 2 files per rank
    writer = HuggingFaceStorageWriter(path, fqn_to_index_mapping=mapping, save_distributed=True,
                                      enable_consolidation=consolidate)
    dcp.save(_dtensors(SAVE_LAYOUT, zero=False), storage_writer=writer)


def load_body(path: str, layout: dict[str, str], api: str) -> dict[str, int]:
    """Load into ``layout`` (plain ``dcp.load`` or ``load_fp8_state_dict``); compare full tensors bit for bit
    on this rank.  Returns name -> elements this rank held (empty shards included)."""
    from torch.distributed.tensor import DTensor

    sd = _dtensors(layout, zero=True)
    if api == "dcp":
        dcp.load(sd, storage_reader=sa.StreamingFP8StorageReader(path))
    else:
        sa.load_fp8_state_dict(sd, path)
    held = {}
    for name, want in full_tensors().items():
        got = sd[name]
        held[name] = got.to_local().numel() if isinstance(got, DTensor) else got.numel()
        got = got.full_tensor() if isinstance(got, DTensor) else got
        assert_bit_equal(got, want, name)
    return held


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory) -> dict[str, str]:
    """torch's own writer at world 2: pieces in one file per rank, in two files per rank, and consolidated."""
    root = tmp_path_factory.mktemp("dcp_hf")
    out = {}
    for name, consolidate, split in [("sharded", False, False), ("sharded_2files", False, True),
                                     ("consolidated", True, True)]:
        out[name] = str(root / name)
        pool.run(save_body, out[name], consolidate, split)
    return out


def _header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_torch_writer_output_is_what_we_think(saved):
    """The fixture is the real thing: per-rank files with DCP_SHARDING_INFO offsets, an empty shard, a
    tensor in pieces across files, and a consolidated folder (index + whole tensors, pieces in sharded/)."""
    files = sorted(Path(saved["sharded"]).glob("*.safetensors"))
    assert [f.name for f in files] == ["shard-00001-model-00001-of-00001.safetensors",
                                       "shard-00002-model-00001-of-00001.safetensors"]
    h2 = _header(files[1])
    info = json.loads(h2["__metadata__"]["DCP_SHARDING_INFO"])
    assert info["tok_embeddings.weight"]["saved_offsets"] == [19, 0]
    assert h2["tok_embeddings.weight"]["shape"] == [18, 16]
    assert h2["layers.0.one_row"]["shape"] == [0, 8]  # the empty shard is written
    idx = CheckpointIndex.open(saved["sharded_2files"], allow_pieces=True)
    assert len({f for f in (p.file for _, p in idx["tok_embeddings.weight"].pieces)}) == 2
    assert isinstance(idx["layers.0.attention.wo.weight"], ShardedTensorInfo)
    assert not isinstance(idx["layers.0.one_row"], ShardedTensorInfo)  # one non-empty piece at 0: whole
    assert (Path(saved["consolidated"]) / "model.safetensors.index.json").exists()
    assert not CheckpointIndex.open(saved["consolidated"]).sharded


@pytest.mark.parametrize("variant", ["sharded", "sharded_2files", "consolidated"])
def test_world1_loads_torch_distributed_save(saved, variant):
    want = full_tensors()
    for reader in (sa.StreamingFP8StorageReader(saved[variant]), dcp.HuggingFaceStorageReader(saved[variant])):
        sd = {k: poisoned_like(v.shape, v.dtype) if v.is_floating_point() else torch.zeros_like(v)
              for k, v in want.items()}
        dcp.load(sd, storage_reader=reader)  # torch's own reader agrees: the fixture is readable as saved
        for k in want:
            assert_bit_equal(sd[k], want[k], k)
    report = sa.load_fp8_state_dict({k: torch.zeros_like(v) for k, v in want.items()}, saved[variant])
    assert report.tensors >= len(want)


@pytest.mark.parametrize("variant", ["sharded", "sharded_2files", "consolidated"])
@pytest.mark.parametrize("api", ["dcp", "load_fp8_state_dict"])
def test_world2_reshards_torch_distributed_save(pool, saved, variant, api):
    held = pool.run(load_body, saved[variant], LOAD_LAYOUT_2, api)
    assert held[0]["layers.0.attention.wq.weight"] == 24 * 8 == held[1]["layers.0.attention.wq.weight"]


@pytest.fixture(scope="module")
def pool4(pool):
    p = ProcessGroupPool(4)
    yield p
    p.close()


@pytest.mark.parametrize("variant", ["sharded_2files", "consolidated"])
def test_world4_fsdp_over_tp_with_empty_shards(pool4, saved, variant):
    held = pool4.run(load_body, saved[variant], LOAD_LAYOUT_4, "dcp")
    assert [h["layers.0.feed_forward.w1.weight"] for h in held] == [16, 16, 16, 0]  # rank 3: empty shard
    assert sum(h["tok_embeddings.weight"] for h in held) == 37 * 16


def test_storage_data_keeps_torchs_type(saved, checkpoints):
    for path in (saved["sharded_2files"], checkpoints("llama", "fp8_block")):
        md = sa.StreamingFP8StorageReader(path).read_metadata()
        assert md.storage_data and all(isinstance(v, _HFStorageInfo) for v in md.storage_data.values())
        for idx, info in md.storage_data.items():
            assert os.path.isfile(info.relative_path)
            chunk = next(c for c in md.state_dict_metadata[idx.fqn].chunks if list(c.offsets) == list(idx.offset))
            assert tuple(info.shape) == tuple(chunk.sizes)
    md = sa.StreamingFP8StorageReader(checkpoints("llama", "fp8_block")).read_metadata()
    w = next(v for k, v in md.storage_data.items() if k.fqn == "model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.float8_e4m3fn  # the stored dtype; the planner's metadata says BF16
    assert md.state_dict_metadata["model.layers.0.self_attn.q_proj.weight"].properties.dtype == torch.bfloat16


def test_missing_shard_file_and_whole_tensor_readers(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved["sharded_2files"], broken)
    with pytest.raises(CheckpointError, match="pieces across files") as e:
        CheckpointIndex.open(broken)  # conversion & co. read tensors whole: told how to consolidate
    assert "consolidate" in e.value.fix
    # The last rank's file gone: the pieces' bounding box (all the headers say about the full shape, for
    # torch's reader too) shrinks to 19 rows; the file names' numbered series (shard-00002-model-0000k-of-
    # 00002) says one is missing before anything is read.
    last = next(f for f in sorted(broken.glob("shard-00002-*")) if "tok_embeddings.weight" in _header(f))
    shutil.move(last, tmp_path / last.name)
    sd = {"tok_embeddings.weight": torch.zeros(37, 16, dtype=torch.bfloat16)}
    with pytest.raises(IncompleteCheckpointError, match=re.escape(last.name)):
        sa.load_fp8_state_dict(sd, broken)
    # Without the series (a lone file per rank), the destination's shape is what catches it.
    lone = broken.parent / "lone"
    shutil.copytree(broken, lone)
    for f in sorted(lone.glob("shard-00002-*")):
        f.rename(lone / (f.stem + "-x.safetensors"))  # out of the numbered series
    with pytest.raises(DestinationError, match=r"destination shape \[37, 16\] differs .* \[19, 16\]"):
        sa.load_fp8_state_dict(sd, lone)
    # The first rank's file gone instead: a gap at rows 0..18, found from the headers.
    shutil.move(tmp_path / last.name, last)
    next(f for f in sorted(broken.glob("shard-00001-*")) if "tok_embeddings.weight" in _header(f)).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"cover (288 of its 592|192 of its 384) elements") as e:
        sa.StreamingFP8StorageReader(broken)  # tok_embeddings (rows 0..18 gone) or wo (columns 0..11 gone)
    assert e.value.tensor in ("tok_embeddings.weight", "layers.0.attention.wo.weight")
    assert "shard file is missing" in e.value.fix


# -- reset(checkpoint_id) --------------------------------------------------------------------------------
def test_reset_loads_the_checkpoint_it_is_given(checkpoints):
    a = checkpoints("llama", "fp8_block")
    b = checkpoints("llama", "fp8_block", seed=1)
    c = checkpoints("mistral", "fp8_tensor")  # another adapter: fp8/tensor
    reader = sa.StreamingFP8StorageReader(a)
    for path in (b, c, a):
        ref = reference_state_dict(path)
        sd = {k: poisoned_like(v.shape, torch.bfloat16 if v.dtype != torch.float32 else v.dtype)
              for k, v in ref.items()}
        dcp.load(sd, storage_reader=reader, checkpoint_id=path)
        assert reader.index.path == path.resolve()
        for k in ref:
            assert_bit_equal(sd[k], ref[k].to(sd[k].dtype), k)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reference_state_dict(a)[w], reference_state_dict(b)[w])  # the two really differ


# -- our errors through plain dcp.load ---------------------------------------------------------------------
def test_plain_dcp_load_raises_our_errors_not_checkpoint_exception(checkpoints, tmp_path):
    good = checkpoints("llama", "fp8_block")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    f = sorted(corrupt.glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-100])  # a truncated download
    noscale = tmp_path / "noscale"
    shutil.copytree(good, noscale)
    for g in noscale.glob("*.safetensors"):  # drop one scale: its FP8 weight cannot be dequantized
        from safetensors.torch import load_file

        t = load_file(g)
        if "model.layers.0.self_attn.q_proj.weight_scale_inv" in t:
            del t["model.layers.0.self_attn.q_proj.weight_scale_inv"]
            save_file(t, g)
    index = noscale / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    del wm["weight_map"]["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    index.write_text(json.dumps(wm))
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(reference_state_dict(good)[
        "model.layers.0.self_attn.q_proj.weight"].shape, dtype=torch.bfloat16)}
    for bad, err in ((corrupt, CorruptCheckpointError), (noscale, MissingScaleError)):
        for how in ("checkpoint_id", "constructor"):
            try:
                if how == "checkpoint_id":
                    dcp.load(sd, storage_reader=sa.StreamingFP8StorageReader(good), checkpoint_id=bad)
                else:
                    dcp.load(sd, storage_reader=sa.StreamingFP8StorageReader(bad))
            except Exception as e:  # noqa: BLE001 -- the point: `except Exception` catches it
                assert isinstance(e, err) and not isinstance(e, CheckpointException), (how, type(e))
                assert e.file and e.fix
            else:
                pytest.fail(f"{bad.name} via {how} loaded")


def test_damage_found_while_reading_bytes_is_wrapped_by_dcp_and_unwrapped_by_us(checkpoints, tmp_path):
    """The boundary (docs/architecture.md): a NaN in a scale block shows only when that block is read,
    inside DCP's read step, which wraps every exception in CheckpointException (a BaseException);
    load_fp8_state_dict raises our error itself."""
    from safetensors.torch import load_file

    nan = tmp_path / "nan"
    shutil.copytree(checkpoints("llama", "fp8_block"), nan)
    w, s = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv"
    f = nan / json.loads((nan / "model.safetensors.index.json").read_text())["weight_map"][s]
    t = load_file(f)
    t[s][0, 0] = float("nan")
    save_file(t, f)
    shape = reference_state_dict(checkpoints("llama", "fp8_block"))[w].shape
    reader = sa.StreamingFP8StorageReader(nan)  # the headers are fine: no error yet
    with pytest.raises(CheckpointException) as e:
        dcp.load({w: torch.zeros(shape, dtype=torch.bfloat16)}, storage_reader=reader)
    (_exc, _tb), = e.value.failures.values()
    assert isinstance(_exc, ScaleLayoutError) and "not finite" in str(_exc)
    with pytest.raises(ScaleLayoutError, match="not finite"):
        sa.load_fp8_state_dict({w: torch.zeros(shape, dtype=torch.bfloat16)}, nan)


# -- FP8 MoE with fused experts and per-expert scales -----------------------------------------------------
E, INTER, HIDDEN = 3, 40, 48   # gate_up [3, 80, 48], down [3, 48, 40]
PREFIX = "model.layers.0.mlp.experts"


def _transformers_quantize(name: str, w: torch.Tensor, block: list[int] | None) -> dict[str, torch.Tensor]:
    """transformers 5.25's own save-side quantizer (``Fp8Quantize``), the producer of fused FP8 experts."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=block, scale_fmt=None))
    return Fp8Quantize(quantizer).convert({name: w})


def _fused_checkpoint(root, kind: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Folder with fused expert weights + scales; returns (path, expected BF16 values)."""
    g = torch.Generator().manual_seed(5)
    raw = {f"{PREFIX}.gate_up_proj": torch.randn(E, 2 * INTER, HIDDEN, generator=g),
           f"{PREFIX}.down_proj": torch.randn(E, HIDDEN, INTER, generator=g)}
    tensors: dict[str, torch.Tensor] = {"model.layers.0.mlp.gate.weight": torch.randn(E, HIDDEN, generator=g)}
    if kind == "block":  # transformers' quantizer: [E, N/16, K/8] F32 grids (it needs N, K multiples of the block)
        block = [16, 8]
        qc = {"quant_method": "fp8", "weight_block_size": block, "activation_scheme": "dynamic"}
        for n, w in raw.items():
            tensors.update(_transformers_quantize(n, w.to(torch.bfloat16), block))
    else:
        qc = {"quant_method": "fp8", "weight_block_size": None, "activation_scheme": "static", "dequantize": False}
        for n, w in raw.items():
            # Mistral-4: one BF16 scale per expert [E]; transformers' FP8Experts: [E, 2, 1] for gate/up
            # (each half its own scale), [E, 1, 1] for down.
            halves = 2 if (kind == "tensor_halves" and n.endswith("gate_up_proj")) else 1
            parts = w.view(E, halves, -1, w.shape[-1])
            amax = parts.abs().amax(dim=(-2, -1))                     # [E, halves]
            scale = (amax / 448).to(torch.bfloat16 if kind == "mistral4" else torch.float32)
            codes = (parts / scale.float()[..., None, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[n] = codes.view(w.shape)
            tensors[n + "_scale_inv"] = scale.view(E) if kind == "mistral4" else scale.view(E, halves, 1)
            tensors[n + "_activation_scale"] = torch.ones(E, dtype=torch.float32)
    path = root / kind
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    return str(path), _expected_fused(tensors, qc)


def _expected_fused(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """(fp32(w) * fp32(scale broadcast over its block)).to(bf16), blocks in global coordinates."""
    out = {"model.layers.0.mlp.gate.weight": tensors["model.layers.0.mlp.gate.weight"]}
    for n in (f"{PREFIX}.gate_up_proj", f"{PREFIX}.down_proj"):
        w, s = tensors[n].float(), tensors[n + "_scale_inv"].float()
        if s.dim() == 1:
            s = s.view(E, 1, 1)
        bm, bn = qc["weight_block_size"] or (w.shape[1] // s.shape[1], w.shape[2])
        full = s.repeat_interleave(bm, 1)[:, : w.shape[1]].repeat_interleave(bn, 2)[:, :, : w.shape[2]]
        out[n] = (w * full).to(torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("fused")
    return {k: _fused_checkpoint(root, k) for k in ("block", "mistral4", "tensor_halves")}


@pytest.mark.parametrize("kind", ["block", "mistral4", "tensor_halves"])
def test_fused_expert_scales_load_bit_exact(fused, kind):
    path, want = fused[kind]
    reader = sa.StreamingFP8StorageReader(path)
    logical = reader.logical_tensors()
    assert logical[f"{PREFIX}.gate_up_proj"].quantized and logical[f"{PREFIX}.down_proj"].quantized
    assert not any(k.endswith(("_scale_inv", "_activation_scale")) for k in logical)  # scales are hidden
    sd = {k: poisoned_like(v.shape, torch.bfloat16 if k.startswith(PREFIX) else v.dtype) for k, v in want.items()}
    report = sa.load_fp8_state_dict(sd, path, chunk_bytes=1 << 16)
    assert report.quantized == 2
    for k in want:
        assert_bit_equal(sd[k], want[k], k)


def test_fused_experts_convert_to_bf16_and_are_refused_for_nvfp4(fused, tmp_path):
    from safetensors.torch import load_file

    path, want = fused["block"]
    sa.convert_checkpoint(path, str(tmp_path / "bf16"), target="bf16")
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    for k in want:
        assert_bit_equal(got[k], want[k], k)
    with pytest.raises(CheckpointError, match="fused experts") as e:
        sa.convert_checkpoint(path, str(tmp_path / "nvfp4"), target="nvfp4")
    assert "target=bf16" in e.value.fix and e.value.tensor.startswith(f"{PREFIX}.")


def fused_tp_body(path: str, dim: int) -> int:
    """TP over the fused rows (dim 1: 80 rows -> 40 per rank, cutting a 16-row block) or columns (dim 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    want = _expected_from_files(path)
    sd = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(dim)])
          for k, v in want.items() if k.startswith(PREFIX)}
    dcp.load(sd, storage_reader=sa.StreamingFP8StorageReader(path))
    for k, v in sd.items():
        assert_bit_equal(v.full_tensor(), want[k], k)
    return sd[f"{PREFIX}.gate_up_proj"].to_local().shape[dim]


def _expected_from_files(path: str) -> dict[str, torch.Tensor]:
    """Expected values recomputed from the files (the worker did not build them)."""
    from safetensors.torch import load_file

    qc = json.loads(Path(path, "config.json").read_text())["quantization_config"]
    return _expected_fused(load_file(Path(path, "model.safetensors")), qc)


@pytest.mark.parametrize("dim", [1, 2])
def test_fused_expert_scales_tp2(pool, fused, dim):
    assert pool.run(fused_tp_body, fused["block"][0], dim) == [40 if dim == 1 else 24] * 2


def test_fused_per_expert_scale_of_wrong_shape_is_named(tmp_path):
    w = torch.zeros(E, 2 * INTER, HIDDEN).to(torch.float8_e4m3fn)
    save_file({f"{PREFIX}.gate_up_proj": w, f"{PREFIX}.gate_up_proj_scale_inv": torch.ones(E, 3, 1)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                              "weight_block_size": None}}))
    with pytest.raises(CheckpointError, match=r"per-tensor scale of shape \[3, 3, 1\]") as e:
        sa.StreamingFP8StorageReader(tmp_path)
    assert e.value.tensor == f"{PREFIX}.gate_up_proj_scale_inv"


def test_fused_fp8_experts_fill_a_transformers_model(checkpoints, tmp_path):
    """End to end: a Qwen3-MoE checkpoint whose experts are stored fused (transformers' own Fp8Quantize on
    gate_up [E, 2I, H] / down [E, H, I], 32x32 blocks) fills the real transformers model's fused expert
    parameters through load_fp8_checkpoint (identity key mapping), bit for bit."""
    import model_bodies as B

    base = checkpoints("qwen3_moe", "fp8_block")
    ref = reference_state_dict(base)  # the per-expert checkpoint's values (BF16, routers F32)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32], "activation_scheme": "dynamic"}
    tensors = {k: v for k, v in ref.items() if ".mlp.experts." not in k}  # the rest stored unquantized
    want = dict(tensors)
    prefixes = sorted({k.split(".experts.")[0] for k in ref if ".mlp.experts." in k})
    n = 1 + max(int(k.split(".experts.")[1].split(".")[0]) for k in ref if ".mlp.experts." in k)
    for prefix in prefixes:
        fused = {
            f"{prefix}.experts.gate_up_proj": torch.stack([torch.cat(
                [ref[f"{prefix}.experts.{e}.gate_proj.weight"], ref[f"{prefix}.experts.{e}.up_proj.weight"]])
                for e in range(n)]),
            f"{prefix}.experts.down_proj": torch.stack(
                [ref[f"{prefix}.experts.{e}.down_proj.weight"] for e in range(n)]),
        }
        for name, w in fused.items():
            q = _transformers_quantize(name, w, [32, 32])
            tensors.update(q)
            codes, scale = q[name].float(), q[name + "_scale_inv"]
            want[name] = (codes * scale.repeat_interleave(32, 1).repeat_interleave(32, 2)).to(torch.bfloat16)
    path = tmp_path / "fused"
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    model = B.meta_model(path)
    B.materialize(model)
    report = sa.load_fp8_checkpoint(model, path)
    assert report.quantized == 2 * len(prefixes)
    sd = model.state_dict()
    assert f"{PREFIX}.gate_up_proj" in sd and set(want) <= set(sd)
    for k, v in want.items():
        assert_bit_equal(sd[k], v.to(sd[k].dtype), k)
