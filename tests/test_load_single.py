"""World size 1: every format x family loads bit-exactly, and real clients agree.

References: the independent fp32 formula (tests/reference.py), compressed-tensors' own dequantizer
(compressed-tensors checkpoints), torch's QuantizedHuggingFaceStorageReader (block checkpoints).  The
stock HuggingFaceStorageReader is shown to get the same checkpoints silently wrong.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

import streaming_adapters as sa
from helpers import assert_bit_equal, poisoned_like
from reference import load_all, reference_state_dict
from streaming_adapters.testing.fixtures import FORMATS



def _load_all_keys(path, **kw):
    ref = reference_state_dict(path)
    sd = {k: poisoned_like(v.shape, v.dtype if v.dtype == torch.float32 else torch.bfloat16) for k, v in ref.items()}
    report = sa.load_fp8_state_dict(sd, path, **kw)
    return sd, ref, report


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_every_format_bit_exact(checkpoints, fmt, backend):
    path = checkpoints("llama", fmt)
    # A 64 KiB chunk budget forces every large tensor through several sub-boxes.
    sd, ref, report = _load_all_keys(path, io_backend=backend, chunk_bytes=1 << 16)
    for k in ref:
        assert_bit_equal(sd[k], ref[k].to(sd[k].dtype), k)
    n_fp8 = sum(1 for k in ref if k.endswith("proj.weight")) if fmt != "bf16" else 0
    assert report.quantized == n_fp8 and report.tensors == len(ref)
    assert report.bytes_read > 0 and report.seconds > 0


@pytest.mark.parametrize("family", ["mistral", "ministral3", "qwen3", "qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_tensor", "ct_block"])
def test_every_family_bit_exact(checkpoints, family, fmt):
    sd, ref, _ = _load_all_keys(checkpoints(family, fmt))
    for k in ref:
        assert_bit_equal(sd[k], ref[k].to(sd[k].dtype), k)


def test_fp32_destination_gets_the_exact_product(checkpoints):
    path = checkpoints("deepseek_v3", "fp8_block")
    raw = load_all(path)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [576, 256], 5-row scale grid
    dst = {name: poisoned_like(raw[name].shape, torch.float32)}
    sa.load_fp8_state_dict(dst, path)
    s = raw[name.replace(".weight", ".weight_scale_inv")]
    assert s.shape == (5, 2)
    want = raw[name].float() * s.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :256]
    assert_bit_equal(dst[name], want, name)


def test_scales_in_another_file(checkpoints):
    path = checkpoints("llama", "fp8_block", scales_in_other_file=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    w = "model.layers.0.self_attn.q_proj.weight"
    assert index[w] != index[w.replace(".weight", ".weight_scale_inv")]
    sd, ref, _ = _load_all_keys(path)
    for k in ref:
        assert_bit_equal(sd[k], ref[k].to(sd[k].dtype), k)


def test_scales_are_hidden_but_loadable_on_request(checkpoints):
    path = checkpoints("mistral", "fp8_tensor")
    reader = sa.StreamingFP8StorageReader(path)
    md = reader.read_metadata()
    w = "model.layers.0.self_attn.q_proj.weight"
    assert md.state_dict_metadata[w].properties.dtype == torch.bfloat16
    assert not any(k.endswith(("weight_scale_inv", "activation_scale")) for k in md.state_dict_metadata)
    # Asked for by name, they load as stored (BF16 0-dim for Mistral).
    raw = load_all(path)
    sd = {k: torch.zeros((), dtype=torch.bfloat16) for k in
          ("model.layers.0.self_attn.q_proj.weight_scale_inv", "model.layers.0.self_attn.q_proj.activation_scale")}
    sa.load_fp8_state_dict(sd, path)
    for k, v in sd.items():
        assert_bit_equal(v, raw[k], k)


def test_e8m0_scales_do_not_break_metadata(checkpoints):
    path = checkpoints("deepseek_v3", "fp8_block_e8m0")
    with safe_open(next(path.glob("*.safetensors")), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F8_E8M0" in dtypes
    with pytest.raises(KeyError, match="F8_E8M0"):  # torch's stock reader cannot even read the metadata
        dcp.HuggingFaceStorageReader(str(path)).read_metadata()
    md = sa.StreamingFP8StorageReader(path).read_metadata()
    assert md.state_dict_metadata["model.layers.0.mlp.down_proj.weight"].properties.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["ct_tensor", "ct_channel", "ct_group", "ct_block", "ct_naive_channel"])
def test_matches_compressed_tensors_dequantizer(checkpoints, fmt):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    # compressed-tensors' group path needs K % group == 0 (K in {320, 200} here); 40 divides both.
    path = checkpoints("qwen3", fmt, **({"group": 40} if fmt == "ct_group" else {}))
    raw = load_all(path)
    # Its tensor matcher treats target "Linear" as every `*.weight`; name the unquantized modules.
    unquantized = [k[: -len(".weight")] for k in raw if k.endswith(".weight") and k.replace(".weight", ".weight_scale") not in raw]
    theirs = CompressedTensorsDequantizer(str(path), ignore=unquantized, dtype=torch.bfloat16).process(raw)
    sd = {k: poisoned_like(v.shape) for k, v in theirs.items() if k.endswith("proj.weight")}
    assert len(sd) == 21
    sa.load_fp8_state_dict(sd, path)
    for k in sd:
        assert_bit_equal(sd[k], theirs[k], k)


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_matches_torch_quantized_reader_on_block_checkpoints(checkpoints, family):
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    path = checkpoints(family, "fp8_block")
    ref = reference_state_dict(path)
    keys = [k for k in ref if ref[k].dtype == torch.bfloat16]
    theirs = {k: poisoned_like(ref[k].shape) for k in keys}
    dcp.load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(str(path), block_size=128), no_dist=True)
    ours = {k: poisoned_like(ref[k].shape) for k in keys}
    sa.load_fp8_state_dict(ours, path)
    for k in keys:
        assert_bit_equal(ours[k], theirs[k], k)


def test_stock_reader_is_silently_wrong_and_ours_is_not(checkpoints):
    path = checkpoints("llama", "fp8_block")
    ref = reference_state_dict(path)
    k = "model.layers.1.mlp.down_proj.weight"
    stock = {k: poisoned_like(ref[k].shape)}
    dcp.load(stock, storage_reader=dcp.HuggingFaceStorageReader(str(path)), no_dist=True)  # no error...
    codes = load_all(path)[k]
    assert_bit_equal(stock[k], codes.to(torch.bfloat16), k)  # ...the raw FP8 codes, scale dropped
    ratio = stock[k].float().abs().max() / ref[k].float().abs().max()
    assert ratio > 50, f"stock reader off by only {ratio:.1f}x"
    ours = {k: poisoned_like(ref[k].shape)}
    sa.load_fp8_state_dict(ours, path)
    assert_bit_equal(ours[k], ref[k], k)


def test_partial_and_empty_requests(checkpoints):
    path = checkpoints("llama", "fp8_block")
    assert sa.load_fp8_state_dict({}, path).tensors == 0
    ref = reference_state_dict(path)
    k = "model.layers.2.self_attn.o_proj.weight"
    sd = {k: poisoned_like(ref[k].shape), "model.layers.9.mlp.up_proj.weight": torch.zeros(200, 320)}
    report = sa.load_fp8_state_dict(sd, path, strict=False)
    assert report.missing == ["model.layers.9.mlp.up_proj.weight"]
    assert_bit_equal(sd[k], ref[k], k)


def test_report_line_and_json(checkpoints, tmp_path):
    path = checkpoints("llama", "fp8_block")
    _, _, report = _load_all_keys(path)
    line = str(report)
    assert "fp8/block" in line and "GB/s" in line and "largest transient" in line and "\n" not in line
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data["bytes_read"] == report.bytes_read > 0
    assert data["ranks"][0]["quantized"] == 21


def test_adapter_registry_and_user_adapter(tmp_path, checkpoints):
    names = {(a["quant_method"], a["layout"]) for a in sa.list_adapters()}
    assert {("fp8", "block"), ("fp8", "tensor"), ("compressed-tensors", "float"), ("modelopt", "fp8"),
            ("fbgemm_fp8", "channel"), (None, "unquantized")} <= names
    assert sa.get_adapter({"quant_method": "fp8", "weight_block_size": [128, 128]}).name == "fp8/block"
    assert sa.get_adapter({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}).name == "fp8/tensor"

    # A user format in a few lines: per-row scales under another name (docs/adapters.md shows the same).
    @sa.register_adapter
    class RowFP8(sa.StreamingFP8StateDictAdapter):
        quant_method = "my_row_fp8"
        layout = "channel"
        scale_suffixes = ("qscale_weight",)

        def scale_block(self, weight, scale):
            return (1, weight.shape[1])

    try:
        src = checkpoints("llama", "fbgemm")
        dst = tmp_path / "mine"
        dst.mkdir()
        from safetensors.torch import save_file
        wm = {}
        for f in src.glob("*.safetensors"):
            t = {k.replace(".weight_scale", ".qscale_weight"): v for k, v in load_all_file(f).items()}
            save_file(t, dst / f.name)
            wm.update({k: f.name for k in t})
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "my_row_fp8"}
        (dst / "config.json").write_text(json.dumps(cfg))
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        assert sa.get_adapter(dst).name == "my_row_fp8/channel"
        ref = reference_state_dict(src)
        sd = {k: poisoned_like(v.shape, v.dtype) for k, v in ref.items()}
        sa.load_fp8_state_dict(sd, dst)
        for k in ref:
            assert_bit_equal(sd[k], ref[k], k)
    finally:
        from streaming_adapters.formats import unregister_adapter

        unregister_adapter("my_row_fp8", "channel")


def load_all_file(f):
    from safetensors.torch import load_file

    return load_file(f)
