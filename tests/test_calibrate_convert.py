"""W4A4 conversion: the W4A16 weights byte for byte, plus input scales from the calibrated amax, the
config blocks both formats' loaders read, the tokens' sha256 in the metadata and report."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization.utils import generate_gparam
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calib_fixtures import random_ids, whole_model_amax, write_jsonl
from helpers import assert_bit_equal
from streaming_adapters.calibrate import CalibrationConfig, load_calibration_tokens
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.convert.verify import verify_checkpoint
from streaming_adapters.errors import CalibrationDataError, CheckpointError


def read_all(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, meta = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta.update(h.metadata() or {})
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out, meta


@pytest.fixture(scope="module")
def calib_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return write_jsonl(d / "ids.jsonl", [{"input_ids": r} for r in random_ids(5, 48, seed=3)])


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_w4a4_is_w4a16_plus_input_scales(checkpoints, tmp_path, calib_data, fmt):
    src = checkpoints("llama", "fp8_block")
    cal = CalibrationConfig(data=str(calib_data), samples=4, seq_len=40)
    w16 = tmp_path / "w4a16"
    w4 = tmp_path / "w4a4"
    convert_checkpoint(src, w16, target="nvfp4", format=fmt, progress=False)
    rep = convert_checkpoint(src, w4, target="nvfp4", format=fmt, calibration=cal, progress=False)
    a16, _ = read_all(w16)
    a4, meta = read_all(w4)
    for k, v in a16.items():  # every weight tensor byte-identical to the weight-only output
        assert_bit_equal(a4[k], v, k)
    suffix = ".input_global_scale" if fmt == "compressed-tensors" else ".input_scale"
    extra = sorted(set(a4) - set(a16))
    gs_key = ".weight_global_scale" if fmt == "compressed-tensors" else ".weight_scale_2"
    assert extra == sorted(k[: -len(gs_key)] + suffix for k in a16 if k.endswith(gs_key)) and len(extra) == 18

    toks = load_calibration_tokens(calib_data, samples=4, seq_len=40)
    want = whole_model_amax(src, toks, "eager" if fmt == "compressed-tensors" else "sdpa")
    for k in extra:
        a = torch.tensor(want[k[: -len(suffix)]], dtype=torch.bfloat16)
        if fmt == "compressed-tensors":  # the real generate_gparam on the BF16 amax
            exp = generate_gparam(-a.reshape(1), a.reshape(1)).to(torch.float32)
        else:  # GPU export: fp32(amax) * fp32(1/2688)
            exp = (a.float() * torch.tensor(1 / 2688, dtype=torch.float32)).reshape(())
        assert_bit_equal(a4[k], exp, k)
    q = "model.layers.2.self_attn."
    assert a4[q + "q_proj" + suffix] == a4[q + "k_proj" + suffix] == a4[q + "v_proj" + suffix]

    assert meta["calibration_tokens_sha256"] == toks.sha256
    assert rep.calibration["tokens_sha256"] == toks.sha256 and len(rep.calibration["layers"]) == 3
    qc = json.loads((w4 / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        ia = qc["config_groups"]["group_0"]["input_activations"]
        assert (ia["dynamic"], ia["strategy"], ia["type"], ia["num_bits"], ia["group_size"], ia["observer"]) == \
            ("local", "tensor_group", "float", 4, 16, "static_minmax")
        assert qc["format"] == "nvfp4-pack-quantized"
    else:
        assert qc["quant_algo"] == "NVFP4"
        assert qc["config_groups"]["group_0"]["input_activations"] == \
            {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        hq = json.loads((w4 / "hf_quant_config.json").read_text())
        assert hq["quantization"]["quant_algo"] == "NVFP4"

    v = verify_checkpoint(w4, src)
    assert v.ok and v.input_scales == 18 and not v.input_scale_problems, v.table()
    assert verify_checkpoint(w16, src).input_scales == 0
    # A k_proj scale that differs from its q/v siblings, and a missing one, are reported.
    f = next(p for p in w4.glob("*.safetensors") if q + "k_proj" + suffix in load_file(p))
    t = load_file(f)
    t[q + "k_proj" + suffix] = t[q + "k_proj" + suffix] * 2
    del t["model.layers.2.mlp.up_proj" + suffix]
    save_file(t, f, metadata={"format": "pt"})
    idx = json.loads((w4 / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.2.mlp.up_proj" + suffix]
    (w4 / "model.safetensors.index.json").write_text(json.dumps(idx))
    bad = verify_checkpoint(w4, src)
    assert not bad.ok and len(bad.input_scale_problems) == 2, bad.input_scale_problems
    assert "input scales differ" in " ".join(bad.input_scale_problems) and "no input" in " ".join(bad.input_scale_problems)


def test_calibration_errors_come_before_any_output(checkpoints, tmp_path, calib_data):
    src = checkpoints("llama", "fp8_block")
    with pytest.raises(CalibrationDataError, match="fewer than the 512 asked for"):
        convert_checkpoint(src, tmp_path / "o", target="nvfp4", calibration=str(calib_data), progress=False)
    assert not (tmp_path / "o.partial").exists() and not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="calibration needs target='nvfp4'"):
        convert_checkpoint(src, tmp_path / "o", target="bf16", calibration=str(calib_data), progress=False)


def test_attention_knob_overrides_the_formats_producer(checkpoints, tmp_path, calib_data):
    # compressed-tensors calibrates with llm-compressor's eager attention unless calibration.attention says
    # otherwise; sdpa then gives sdpa's amax table (on this fixture some amax differ by a BF16 ulp).
    src = checkpoints("llama", "fp8_block")
    toks = load_calibration_tokens(calib_data, samples=4, seq_len=40)
    sdpa, eager = whole_model_amax(src, toks, "sdpa"), whole_model_amax(src, toks, "eager")
    assert any(sdpa[n] != eager[n] for n in sdpa)
    cal = CalibrationConfig(data=str(calib_data), samples=4, seq_len=40, attention="sdpa")
    rep = convert_checkpoint(src, tmp_path / "w4a4", target="nvfp4", calibration=cal, progress=False)
    a4, _ = read_all(tmp_path / "w4a4")
    keys = [k for k in a4 if k.endswith(".input_global_scale")]
    assert len(keys) == 18
    for k in keys:
        a = torch.tensor(sdpa[k[: -len(".input_global_scale")]], dtype=torch.bfloat16).reshape(1)
        assert_bit_equal(a4[k], generate_gparam(-a, a).to(torch.float32), k)
    assert rep.calibration["attn_implementation"] == "sdpa"
    with pytest.raises(ValueError, match="calibration.attention"):
        CalibrationConfig(data=str(calib_data), attention="flash")
