"""FP8 -> NVFP4 conversion (world size 1) against the real producers and real clients.

For each fixture, the expected output is computed here from the independent reference dequantization
(tests/reference.py): fused groups found by name (formats.md §2.3, written out again below), then
llm-compressor 0.14's path (compressed-tensors code, tests/producers.py) or ModelOpt 0.47's
``NVFP4QTensor``.  The converted files must hold exactly those bytes; compressed-tensors' own dequantizer
must decompress them (and ModelOpt output after ``ModelOptNvfp4Converter``) to what it decompresses the
producers' tensors to.  (World sizes 2 and 4: test_dist_2.py / test_dist_4.py.)
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_bit_equal
from producers import SCHEME, llmcompressor_compress, modelopt_export
from reference import load_all, reference_state_dict
from streaming_adapters.convert import convert_checkpoint

from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter  # noqa: E402

MEMBERS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3")]


def groups_of(names: list[str]) -> list[list[str]]:
    """Fused groups by name, as formats.md §2.3 states them (one per parent module and member set)."""
    out: dict[tuple, list[str]] = {}
    for n in sorted(names):
        parent, leaf = n[: -len(".weight")].rsplit(".", 1)
        gid = next((i for i, m in enumerate(MEMBERS) if leaf in m), None)
        out.setdefault((parent, gid) if gid is not None else (n,), []).append(n)
    return list(out.values())


def expected_nvfp4(src, fmt: str):
    """{module: (packed, block_scale, global_scale)} from the producers, for every weight the converter
    should quantize (FP8 in the source, 2-D, K % 16 == 0)."""
    ref = reference_state_dict(src)
    raw = load_all(src)
    quantized = [k for k, v in raw.items() if v.dtype == torch.float8_e4m3fn and v.shape[-1] % 16 == 0]
    out = {}
    for group in groups_of(quantized):
        ws = [ref[n] for n in group]
        if fmt == "compressed-tensors":
            for n, d in zip(group, llmcompressor_compress(ws)):
                out[n[: -len(".weight")]] = (d["weight_packed"], d["weight_scale"], d["weight_global_scale"])
        else:
            for n, d in zip(group, modelopt_export(ws)):
                out[n[: -len(".weight")]] = d
    return out, ref, raw


def _u8(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


# Llama, Qwen3-MoE and DeepSeek-V3 in block, per-tensor and compressed-tensors FP8 (plus UE8M0 and Mixtral).
CASES = [(family, fmt) for family in ("llama", "qwen3_moe", "deepseek_v3") for fmt in ("fp8_block", "fp8_tensor")]
CASES += [("llama", "ct_group"), ("qwen3_moe", "ct_channel"), ("deepseek_v3", "ct_block"),
          ("deepseek_v3", "fp8_block_u8"), ("mixtral", "ct_block")]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("family,src_fmt", CASES)
def test_nvfp4_equals_the_producer(checkpoints, tmp_path, family, src_fmt, fmt):
    src = checkpoints(family, src_fmt)
    dst = tmp_path / "out"
    report = convert_checkpoint(src, dst, target="nvfp4", format=fmt, step_bytes=1 << 18, progress=False)
    want, ref, raw = expected_nvfp4(src, fmt)
    got = load_all(dst)
    names = ("weight_packed", "weight_scale", "weight_global_scale") if fmt == "compressed-tensors" \
        else ("weight", "weight_scale", "weight_scale_2")
    for mod, (p, s, g) in want.items():
        assert_bit_equal(_u8(got[f"{mod}.{names[0]}"]), _u8(p), f"{mod} packed")
        assert_bit_equal(_u8(got[f"{mod}.{names[1]}"]), _u8(s), f"{mod} block scale")
        assert got[f"{mod}.{names[2]}"].shape == ((1,) if fmt == "compressed-tensors" else ())
        assert_bit_equal(got[f"{mod}.{names[2]}"].reshape(-1), g.reshape(-1).float(), f"{mod} global scale")
    # Everything not quantized is the exact BF16 (or copied) tensor, under its own name.
    for k, v in ref.items():
        if k[: -len(".weight")] not in want:
            assert_bit_equal(got[k], v, k)
    # Nothing else: no source scales, no activation scales (weight-only NVFP4A16 / W4A16_NVFP4).
    assert len(got) == len(ref) - len(want) + 3 * len(want)
    # ignore / exclude_modules: every Linear left unquantized, nothing else.
    linear_unquantized = sorted(k[: -len(".weight")] for k, v in ref.items()
                                if v.dim() == 2 and "embed" not in k and k[: -len(".weight")] not in want)
    assert report.ignore == linear_unquantized
    # ...which are: lm_head, the MoE routers, and the fixtures' K = 200 projections (200 % 16 != 0).
    assert "lm_head" in report.ignore
    for mod in report.ignore:
        w = ref[mod + ".weight"]
        assert mod == "lm_head" or mod.endswith(".gate") or w.shape[1] % 16, (mod, tuple(w.shape))
    _check_config(dst, fmt, linear_unquantized)
    assert (dst / "tokenizer_config.json").exists() and (dst / "generation_config.json").exists()


def _check_config(dst, fmt, ignore):
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    if fmt == "compressed-tensors":
        assert qc["format"] == "nvfp4-pack-quantized" and qc["quant_method"] == "compressed-tensors"
        w = qc["config_groups"]["group_0"]["weights"]
        # vLLM's NVFP4 detection: strategy tensor_group, float, 4 bits, group 16, symmetric.
        assert (w["strategy"], w["type"], w["num_bits"], w["group_size"], w["symmetric"]) == \
            ("tensor_group", "float", 4, 16, True)
        assert qc["config_groups"]["group_0"]["input_activations"] is None and qc["ignore"] == ignore
        assert not (dst / "hf_quant_config.json").exists()
    else:
        hq = json.loads((dst / "hf_quant_config.json").read_text())
        assert hq["producer"]["name"] == "modelopt" and hq["quantization"]["quant_algo"] == "W4A16_NVFP4"
        assert hq["quantization"]["group_size"] == 16 and hq["quantization"]["exclude_modules"] == ignore
        assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "W4A16_NVFP4" and qc["ignore"] == ignore


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_compressed_tensors_dequantizer_reads_it(checkpoints, tmp_path, family):
    """The real client: compressed-tensors' CompressedTensorsDequantizer on the converted folder gives
    exactly what its NVFP4 decompressor gives for the producer's tensors."""
    src = checkpoints(family, "fp8_block")
    convert_checkpoint(src, tmp_path / "out", target="nvfp4", format="compressed-tensors", progress=False)
    want, ref, _ = expected_nvfp4(src, "compressed-tensors")
    out = load_all(tmp_path / "out")
    unquantized = [k[: -len(".weight")] for k in out if k.endswith(".weight")]
    theirs = CompressedTensorsDequantizer(str(tmp_path / "out"), ignore=unquantized).process(out)
    for mod, (p, s, g) in want.items():
        expect = NVFP4PackedCompressor.decompress(
            {"weight_packed": p, "weight_scale": s, "weight_global_scale": g}, SCHEME)["weight"]
        assert_bit_equal(theirs[f"{mod}.weight"], expect.to(torch.bfloat16), mod)


def test_modelopt_output_through_the_compressed_tensors_converter(checkpoints, tmp_path):
    """ModelOpt output -> compressed-tensors' ModelOptNvfp4Converter -> its decompressor gives what the same
    chain gives for ModelOpt's own export of the same weights."""
    src = checkpoints("qwen3_moe", "fp8_block")
    convert_checkpoint(src, tmp_path / "out", target="nvfp4", format="modelopt", progress=False)
    want, _, _ = expected_nvfp4(src, "modelopt")
    ours = ModelOptNvfp4Converter().process(load_all(tmp_path / "out"))
    for mod, (p, s, w2) in want.items():
        theirs = ModelOptNvfp4Converter().process({f"{mod}.weight": p, f"{mod}.weight_scale": s,
                                                   f"{mod}.weight_scale_2": w2})
        a = {k.rpartition(".")[2]: v for k, v in ours.items() if k.startswith(mod + ".")}
        b = {k.rpartition(".")[2]: v for k, v in theirs.items()}
        assert_bit_equal(NVFP4PackedCompressor.decompress(a, SCHEME)["weight"],
                         NVFP4PackedCompressor.decompress(b, SCHEME)["weight"], mod)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_fused_groups_share_one_global_scale(checkpoints, tmp_path, fmt):
    src = checkpoints("deepseek_v3", "fp8_block", scales_in_other_file=True)
    convert_checkpoint(src, tmp_path / "out", target="nvfp4", format=fmt, progress=False)
    got = load_all(tmp_path / "out")
    suffix = ".weight_global_scale" if fmt == "compressed-tensors" else ".weight_scale_2"
    quantized = [k[: -len(suffix)] + ".weight" for k in got if k.endswith(suffix)]
    groups = [g for g in groups_of(quantized) if len(g) > 1]
    kinds = {tuple(sorted(n.rsplit(".", 2)[-2] for n in g)) for g in groups}
    assert {("k_proj", "q_proj", "v_proj"), ("gate_proj", "up_proj"), ("kv_a_proj_with_mqa", "q_a_proj")} <= kinds \
        or {("gate_proj", "up_proj"), ("kv_a_proj_with_mqa", "q_a_proj")} <= kinds
    assert any(".experts." in g[0] for g in groups)  # per expert gate/up
    for g in groups:
        scales = {float(got[n[: -len(".weight")] + suffix].reshape(())) for n in g}
        assert len(scales) == 1, (g, scales)
    # Experts do not share with each other.
    e0 = got["model.layers.1.mlp.experts.0.gate_proj" + suffix]
    e1 = got["model.layers.1.mlp.experts.1.gate_proj" + suffix]
    assert not torch.equal(e0, e1)


def _edge_checkpoint(src, dst):
    """The block-FP8 Llama with edge cases written into its FP8 codes and scales:
    an all-zero tensor (v_proj of layer 0, alone in a fused group with nonzero q/k), all-zero 16-blocks,
    a block whose scale is so small that its NVFP4 block scale underflows, FP8 -0.0 codes, and values on
    exact E2M1 midpoints relative to a power-of-two scale."""
    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]

    def edit(name, fn):
        f = dst / idx[name]
        t = load_file(f)
        fn(t)
        save_file(t, f, metadata={"format": "pt"})

    def zero_v(t):
        t["model.layers.0.self_attn.v_proj.weight"] = torch.zeros_like(
            t["model.layers.0.self_attn.v_proj.weight"].view(torch.uint8)).view(torch.float8_e4m3fn)

    def blocks(t):
        w = t["model.layers.1.self_attn.o_proj.weight"].view(torch.uint8).clone()
        w[:8, :64] = 0                      # all-zero 16-blocks
        w[8:16, 64:80] = 0x80               # -0.0 codes
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], dtype=torch.float8_e4m3fn).view(torch.uint8)
        w[16:24, :8] = ties                 # midpoints of E2M1 with a 6x block max
        w[16:24, 8:16] = ties | 0x80
        t["model.layers.1.self_attn.o_proj.weight"] = w.view(torch.float8_e4m3fn)
        s = t["model.layers.1.self_attn.o_proj.weight_scale_inv"].clone()
        s[1, 1] = 1e-30                     # this 128x128 block's values are ~1e-28: NVFP4 scales underflow
        t["model.layers.1.self_attn.o_proj.weight_scale_inv"] = s

    edit("model.layers.0.self_attn.v_proj.weight", zero_v)
    edit("model.layers.1.self_attn.o_proj.weight", blocks)
    return dst


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_edge_cases_equal_the_producer(checkpoints, tmp_path, fmt):
    src = _edge_checkpoint(checkpoints("llama", "fp8_block"), tmp_path / "edge")
    convert_checkpoint(src, tmp_path / "out", target="nvfp4", format=fmt, progress=False)
    want, ref, _ = expected_nvfp4(src, fmt)
    got = load_all(tmp_path / "out")
    names = ("weight_packed", "weight_scale") if fmt == "compressed-tensors" else ("weight", "weight_scale")
    assert float(ref["model.layers.0.self_attn.v_proj.weight"].abs().max()) == 0
    for mod, (p, s, g) in want.items():
        assert_bit_equal(_u8(got[f"{mod}.{names[0]}"]), _u8(p), f"{mod} packed")
        assert_bit_equal(_u8(got[f"{mod}.{names[1]}"]), _u8(s), f"{mod} block scale")
        assert not torch.isnan(got[f"{mod}.{names[1]}"].float()).any(), "no NaN scales (all-zero guard)"
    v = "model.layers.0.self_attn.v_proj"
    assert int(_u8(got[f"{v}.{names[0]}"]).max()) == 0  # an all-zero member encodes to zeros


def test_world_one_rerun_is_byte_identical_and_report_counts(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", "fp8_block")
    a = convert_checkpoint(src, tmp_path / "a", target="nvfp4", progress=False, step_bytes=1 << 17)
    b = convert_checkpoint(src, tmp_path / "b", target="nvfp4", progress=False, step_bytes=1 << 30)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a.steps > b.steps == 1
    assert re.search(r"written, \d+ steps", a.summary_line())


@pytest.mark.parametrize("target,fmt", [("nvfp4", "compressed-tensors"), ("bf16", None)])
def test_gpu_pipeline_logic_gives_the_same_bytes(checkpoints, tmp_path, target, fmt):
    """The GPU conversion path (one overlapped pipeline run per step) run on CPU: same output bytes."""
    src = checkpoints("deepseek_v3", "fp8_block")
    convert_checkpoint(src, tmp_path / "a", target=target, format=fmt, progress=False)
    convert_checkpoint(src, tmp_path / "b", target=target, format=fmt, progress=False, gpu_pipeline=True,
                       chunk_bytes=1 << 16, readers=3)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
