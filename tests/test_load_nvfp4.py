"""NVFP4 checkpoints in, BF16 out: compressed-tensors ``nvfp4-pack-quantized`` (NVFP4A16, NVFP4 W4A4) and
ModelOpt (``W4A16_NVFP4``, ``NVFP4``; config.json or hf_quant_config.json only), bit for bit against the
producers' own decoders (compressed-tensors 0.20 ``NVFP4PackedCompressor.decompress``, ModelOpt 0.47
``NVFP4QTensor.dequantize``; tests/nvfp4_bodies.py), through ``load_fp8_state_dict`` (one process and two
gloo ranks with DTensors), ``load_fp8_checkpoint`` (a real transformers model) and
``convert_checkpoint(target="bf16")``; plus the refusals: column shards off the 16-column blocks, NVFP4 ->
NVFP4, formats that are neither FP8 nor NVFP4.
"""

from __future__ import annotations

import json

import pytest
import torch

import nvfp4_bodies as NB
import streaming_adapters as sa
from helpers import assert_bit_equal, poisoned_like
from reference import load_all
from streaming_adapters.checkpoint.byteio import BoxReader
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.errors import AlreadyNVFP4Error, MissingScaleError, ScaleLayoutError, UnknownFormatError
from streaming_adapters.read import CpuExecutor
from streaming_adapters.formats import get_adapter
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytest.importorskip("compressed_tensors")
CT, MO = NB.CT, NB.MO
# (format, W4A4, scheme only in hf_quant_config.json)
VARIANTS = [(CT, False, False), (CT, True, False), (MO, False, False), (MO, True, False), (MO, False, True)]
IDS = ["ct-nvfp4a16", "ct-w4a4", "modelopt-w4a16", "modelopt-w4a4", "modelopt-hf_quant_config"]


@pytest.fixture(scope="module")
def nvfp4(checkpoints, tmp_path_factory):
    """(fmt, w4a4, hf_quant_only) -> an NVFP4 checkpoint converted from the llama FP8 block fixture (built once)."""
    root, cache = tmp_path_factory.mktemp("nvfp4"), {}

    def get(fmt, w4a4=False, hf_quant_only=False):
        key = (fmt, w4a4, hf_quant_only)
        if key not in cache:
            name = "-".join([fmt, "w4a4" if w4a4 else "a16"] + (["hfq"] if hf_quant_only else []))
            # One conversion per format; the variants are copies with the W4A4 / config edits.
            src = checkpoints("llama", "fp8_block") if key == (fmt, False, False) else get(fmt)
            cache[key] = NB.make_nvfp4(src, root / name, fmt, w4a4=w4a4, hf_quant_only=hf_quant_only)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvfp4rand")
    return {fmt: NB.make_random_nvfp4(root / fmt, fmt, seed=i) for i, fmt in enumerate((CT, MO))}


def _load(path, **kw):
    ref = NB.producer_state_dict(path)
    sd = {k: poisoned_like(v.shape, torch.float32 if v.dtype == torch.float32 else torch.bfloat16)
          for k, v in ref.items()}
    report = sa.load_fp8_state_dict(sd, path, **kw)
    for k, v in ref.items():
        assert_bit_equal(sd[k], v.to(sd[k].dtype), k)
    return sd, ref, report


# -- one process -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_load_matches_the_producers_decoder(nvfp4, variant):
    fmt, w4a4, hfq = variant
    path = nvfp4(fmt, w4a4, hfq)
    sd, ref, report = _load(path, chunk_bytes=1 << 16)
    index = CheckpointIndex.open(path)
    packed = [k for k in index.tensors if k.endswith(".weight_packed" if fmt == CT else ".weight")
              and index[k].dtype == "U8"]
    assert report.adapter == f"{fmt}/nvfp4" and report.quantized == len(packed) > 0
    # Same logical keys as the FP8 source, weights BF16; no scale or activation key leaks into them.
    src = set(load_all(path).keys())
    assert all(k.endswith(".weight") for k in sd if k not in src) and not any("scale" in k for k in sd)
    assert any(k.endswith("input_global_scale" if fmt == CT else "input_scale") for k in src) == w4a4


@pytest.mark.parametrize("fmt", [CT, MO])
@pytest.mark.parametrize("how", ["mmap", "pread", "pipeline"])
def test_random_codes_and_every_scale_byte(random_ckpt, fmt, how):
    """All 16 codes in both nibbles, every non-NaN E4M3 scale byte (subnormal, -0.0, negative), a 3-D
    tensor, odd row counts; sub-boxes of a 1 KiB chunk; the GPU pipeline's logic on CPU."""
    _, _, report = _load(random_ckpt[fmt], chunk_bytes=1 << 16, io_backend="mmap" if how == "mmap" else "pread",
                         gpu_pipeline=how == "pipeline")
    assert report.quantized == len(NB.RANDOM_SHAPES)


@pytest.mark.parametrize("fmt", [CT, MO])
def test_boxes_on_block_columns_and_any_rows(random_ckpt, fmt):
    """Boxes as DTensor shards give them: any row range, columns on 16-column blocks; sub-chunked."""
    path = random_ckpt[fmt]
    ref = NB.producer_state_dict(path)
    lt = get_adapter(path).plan.logical["a.weight"]  # [37, 96]
    with BoxReader(path, "pread") as io:
        filler = CpuExecutor(io, 1 << 16)
        for start, length in (((5, 32), (31, 48)), ((0, 80), (37, 16)), ((36, 0), (1, 96))):
            got = poisoned_like(length)
            filler.fill([(lt, start, length, got)])
            assert_bit_equal(got, ref["a.weight"][start[0]:start[0] + length[0], start[1]:start[1] + length[1]])
        # A column shard that cuts a block (or a byte) is refused, naming the box and what works.
        for start, length in (((0, 8), (37, 48)), ((0, 0), (37, 40)), ((0, 1), (37, 2))):
            with pytest.raises(ScaleLayoutError) as e:
                filler.fill([(lt, start, length, poisoned_like(length))])
            msg = str(e.value)
            assert f"columns [{start[1]}, {start[1] + length[1]})" in msg and "a.weight" in msg
            assert "Shard(0)" in msg and "[2, 3, 6]" in msg  # K = 96 = 6 blocks


def test_load_fp8_checkpoint_builds_a_model(nvfp4):
    """A real transformers Llama (meta -> to_empty) filled through the family key mapper."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = nvfp4(MO, True)
    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    report = sa.load_fp8_checkpoint(model, path)
    ref = NB.producer_state_dict(path)
    state = model.state_dict()
    for k, v in ref.items():
        assert_bit_equal(state[k], v, k)
    assert report.missing == report.unexpected == [] and report.quantized > 0


@pytest.mark.parametrize("fmt", [CT, MO])
def test_convert_to_bf16(nvfp4, tmp_path, fmt):
    src = nvfp4(fmt, True)
    out = tmp_path / "bf16"
    convert_checkpoint(src, out, target="bf16", step_bytes=1 << 18)
    got, ref = load_all(out), NB.producer_state_dict(src)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert_bit_equal(got[k], v, k)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and not (out / "hf_quant_config.json").exists()
    assert get_adapter(out).name == "unquantized/unquantized"


@pytest.mark.parametrize("fmt", [CT, MO])
def test_nvfp4_to_nvfp4_is_refused(nvfp4, tmp_path, fmt):
    with pytest.raises(AlreadyNVFP4Error, match="already NVFP4"):
        convert_checkpoint(nvfp4(fmt), tmp_path / "again", target="nvfp4", format=fmt)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("qc", [
    {"quant_method": "awq", "bits": 4, "group_size": 128},
    {"quant_method": "gptq", "bits": 4},
    {"quant_method": "mxfp4"},
    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "config_groups": {"group_0": {"format": "pack-quantized", "weights": {"num_bits": 4, "type": "int"}}}},
    {"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"},
], ids=["awq", "gptq", "mxfp4", "ct-int4", "modelopt-w4a8-awq"])
def test_other_formats_are_named(qc):
    with pytest.raises(UnknownFormatError) as e:
        get_adapter({"quantization_config": qc})
    msg = str(e.value)
    assert "not" in msg and "FP8" in msg and "NVFP4" in msg
    assert "compressed-tensors/nvfp4" in msg and "modelopt/nvfp4" in msg and "fp8/block" in msg


def test_broken_nvfp4_checkpoints_are_named(random_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    src = random_ckpt[CT]
    t = load_file(src / "model.safetensors")

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        tt = dict(t)
        edit(tt)
        save_file(tt, d / "model.safetensors")
        return d

    no_gs = variant("no_gs", lambda tt: tt.pop("a.weight_global_scale"))
    with pytest.raises(MissingScaleError, match="a.weight_global_scale"):
        get_adapter(no_gs).plan
    bad = variant("bad_scale", lambda tt: tt.update({"a.weight_scale": tt["a.weight_scale"][:, :5].contiguous()}))
    with pytest.raises(ScaleLayoutError, match=r"F8_E4M3 \[37, 6\]"):
        get_adapter(bad).plan
    nan = variant("nan", lambda tt: tt["b.weight_scale"].view(torch.uint8).__setitem__((3, 1), 0x7F))
    with pytest.raises(ScaleLayoutError, match=r"block \[3, 1\]"):
        sa.load_fp8_state_dict({"b.weight": poisoned_like((64, 48))}, nan)
    with pytest.raises(UnknownFormatError, match="group_size=32"):
        qc = json.loads((src / "config.json").read_text())
        qc["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
        d = variant("g32", lambda tt: None)
        (d / "config.json").write_text(json.dumps(qc))
        get_adapter(d).plan


# -- two gloo ranks, real DTensors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2)
    yield p
    p.close()


@pytest.mark.dist
def test_tp2_column_and_row_parallel(pool, nvfp4):
    """The converted Llama (W4A4, compressed-tensors; ModelOpt runs in test_tp2_random_codes): q/k/v, gate/up
    Shard(0), o_proj Shard(1) (K = 320 -> 160 + 160), vocab-parallel embeddings, replicated norms."""
    results = pool.run(NB.tp_load_nvfp4, str(nvfp4(CT, True)))
    assert all(r[0] > 0 and r[1] > 0 for r in results) and results[0][2] == f"{CT}/nvfp4"


@pytest.mark.dist
@pytest.mark.parametrize("fmt,how", [(CT, ("pread", False)), (MO, ("mmap", True))], ids=["ct-pread", "modelopt-pipeline"])
def test_tp2_random_codes(pool, random_ckpt, fmt, how):
    """Rows split unevenly (37 -> 19 + 18), a 3-D tensor, row-parallel K = 96 -> 48 + 48 columns."""
    results = pool.run(NB.tp_load_nvfp4, str(random_ckpt[fmt]), 1 << 16, *how)
    assert all(r[1] == len(NB.RANDOM_SHAPES) for r in results)


@pytest.mark.dist
def test_tp2_column_shard_off_the_blocks_is_refused_on_every_rank(pool, random_ckpt):
    # b.weight has K = 48 = 3 blocks: Shard(1) over 2 ranks gives columns [0, 24) and [24, 48).
    results = pool.run(NB.column_split_load, str(random_ckpt[MO]), "b.weight")
    for r in results:
        assert r is not None and r[2] == "ScaleLayoutError", r
        assert "columns [0, 24)" in r[1] or "columns [24, 48)" in r[1]
        assert "16-column block" in r[1] and "Shard(0)" in r[1]


# -- the recipes, as users run them (torchrun, 2 ranks) -----------------------------------------------------
@pytest.mark.dist
def test_recipes_load_check_and_dequantize_bf16(nvfp4, tmp_path):
    from launch import entry

    report = tmp_path / "report.json"
    p = entry(["--config-name", "load_check", f"checkpoint.path={nvfp4(MO, True)}", "verify=true",
               f"report.path={report}", "parallel.tp=2"], nproc=2)
    assert "verify: 0 mismatched shard(s)" in p.stdout and json.loads(report.read_text())["adapter"] == "modelopt/nvfp4"
    src, out = nvfp4(CT, True), tmp_path / "bf16"
    entry(["--config-name", "dequantize_bf16", f"checkpoint.path={src}", f"output.path={out}", "parallel.dp_shard=2"],
          nproc=2)
    got = load_all(out)
    for k, v in NB.producer_state_dict(src).items():
        assert_bit_equal(got[k], v, k)
