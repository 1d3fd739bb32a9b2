"""Output targets (formats/outputs), the one ignore syntax (formats/ignore.py) and verify's independent
reference (convert/verify_reference.py): issue 12, items 3 and 6."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.convert.plan import make_plan
from streaming_adapters.convert.verify import verify_checkpoint
from streaming_adapters.formats import get_adapter
from streaming_adapters.formats.ignore import IgnorePatternError, compile_patterns, glob_as_regex
from streaming_adapters.formats.outputs import (ModelOptTarget, get_target, list_targets, register_target,
                                                resolve_target, target_of_config, unregister_target)
from streaming_adapters.numerics import fp8, nvfp4


def test_registry_names_each_format_once():
    assert [(t["name"], t["target"]) for t in list_targets()] == [
        ("bf16", "bf16"), ("compressed-tensors", "nvfp4"), ("modelopt", "nvfp4")]
    assert resolve_target("nvfp4", None).name == "compressed-tensors"  # llm-compressor's, the default
    assert resolve_target("bf16", "hf").format is None and resolve_target("nvfp4", "modelopt").format == "modelopt"
    with pytest.raises(ValueError, match=r"format for nvfp4 must be one of \('compressed-tensors', 'modelopt'\)"):
        resolve_target("nvfp4", "gguf")
    with pytest.raises(ValueError, match="target bf16 takes no format"):
        resolve_target("bf16", "modelopt")
    with pytest.raises(ValueError, match="unknown output format 'x'"):
        get_target("x")

    class Mine(ModelOptTarget):
        name = "modelopt"

    with pytest.warns(UserWarning, match="re-registered: ModelOptTarget -> Mine"):
        register_target(Mine)
    try:
        assert type(resolve_target("nvfp4", "modelopt")) is Mine
    finally:
        with pytest.warns(UserWarning, match="Mine -> ModelOptTarget"):
            register_target(ModelOptTarget)
    assert type(get_target("modelopt")).__name__ == "ModelOptTarget"
    with pytest.raises(TypeError, match="not an OutputTarget subclass"):
        register_target(dict)  # type: ignore[arg-type]
    unregister_target("nonexistent")  # a no-op


def test_each_target_names_scales_and_decodes_as_its_producer(checkpoints):
    index = CheckpointIndex.open(checkpoints("llama", "fp8_block"))
    logical = get_adapter(index.path, index=index).plan.logical
    lt = logical["model.layers.0.self_attn.q_proj.weight"]
    n, k = lt.shape
    ct, mo, bf = get_target("compressed-tensors"), get_target("modelopt"), get_target("bf16")
    assert [(o.name.rsplit(".", 1)[1], o.dtype, o.shape) for o in ct.outputs_for(lt, True, w4a4=True)] == [
        ("weight_packed", "U8", (n, k // 2)), ("weight_scale", "F8_E4M3", (n, k // nvfp4.GROUP)),
        ("weight_global_scale", "F32", (1,)), ("input_global_scale", "F32", (1,))]
    assert [(o.name.rsplit(".", 1)[1], o.shape) for o in mo.outputs_for(lt, True)] == [
        ("weight", (n, k // 2)), ("weight_scale", (n, k // 16)), ("weight_scale_2", ())]
    assert [(o.role, o.dtype) for o in bf.outputs_for(lt, False)] == [("dequant", "BF16")]
    assert not bf.quantizes and ct.can_quantize(lt) and mo.can_quantize(lt)
    down = logical["model.layers.0.mlp.down_proj.weight"]  # K = 200: not a multiple of 16, stays BF16
    assert down.shape[1] % 16 and not ct.can_quantize(down) and not mo.can_quantize(down)
    w = torch.randn(32, 64).to(torch.bfloat16)
    a = nvfp4.tensor_amax(w)
    for t, q, d in ((ct, nvfp4.quantize_ct, nvfp4.dequantize_ct), (mo, nvfp4.quantize_modelopt,
                                                                     nvfp4.dequantize_modelopt)):
        gs = t.global_scale(a)
        p, s = t.quantize(w, gs)
        p2, s2 = q(w, gs)
        assert torch.equal(p, p2) and torch.equal(s.view(torch.uint8), s2.view(torch.uint8))
        assert torch.equal(t.decode(p, s, gs).view(torch.int16), d(p, s, gs).view(torch.int16))
    assert float(ct.global_scale(a)) == float(nvfp4.ct_global_scale(a))
    assert float(mo.input_scale(0.0)) == float(nvfp4.modelopt_scale_2(torch.tensor(6.0)))  # ModelOpt's zero rule


def test_config_files_and_detection():
    src = {"model_type": "llama", "quantization_config": {"quant_method": "fp8"}}
    bf = get_target("bf16").output_files(src, [])
    assert list(bf) == ["config.json"] and bf["config.json"] == {"model_type": "llama", "torch_dtype": "bfloat16"}
    ct = get_target("compressed-tensors").output_files(src, ["lm_head"], w4a4=True)
    assert list(ct) == ["config.json"] and ct["config.json"]["quantization_config"]["ignore"] == ["lm_head"]
    assert ct["config.json"]["quantization_config"]["config_groups"]["group_0"]["input_activations"]["group_size"] == 16
    mo = get_target("modelopt").output_files(src, ["lm_head"])
    assert sorted(mo) == ["config.json", "hf_quant_config.json"]
    assert mo["hf_quant_config.json"]["quantization"] == {
        "quant_algo": "W4A16_NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}
    for name, files in (("bf16", bf), ("compressed-tensors", ct), ("modelopt", mo)):
        assert target_of_config(files["config.json"]).name == name
    assert target_of_config(src) is None  # an FP8 config is no output of ours
    assert get_target("compressed-tensors").is_w4a4(ct["config.json"]) and not get_target("modelopt").is_w4a4(
        mo["config.json"])
    assert src["quantization_config"] == {"quant_method": "fp8"}  # the source's config is not modified


def test_old_names_in_convert_targets_still_work_with_a_warning():
    from streaming_adapters.convert import targets as old

    with pytest.warns(DeprecationWarning, match=r"use streaming_adapters.formats.outputs: get_target\('modelopt'\)"):
        hq = old.modelopt_hf_quant_config(["lm_head"], True)
    assert hq == get_target("modelopt").hf_quant_config(["lm_head"], True)
    with pytest.warns(DeprecationWarning, match="resolve_target"):
        assert old.normalize_target("nvfp4", None) == ("nvfp4", "compressed-tensors")
    assert old.NVFP4_GROUP == nvfp4.GROUP == 16


# -- one ignore syntax ------------------------------------------------------------------------------------

def test_ignore_syntax_is_compressed_tensors_with_the_old_spellings_warned():
    p = compile_patterns(["lm_head", "re:.*mlp\\.gate$", "model.layers.1.mlp.down_proj.weight"])
    assert p.matches("lm_head") and p.matches("model.layers.3.mlp.gate")
    assert not p.matches("model.layers.3.mlp.gate_proj")  # re.match, as compressed-tensors
    assert not p.matches("lm_head.extra") and not p.matches("x.lm_head")  # exact: no prefix, no suffix
    assert p.matches("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight")  # a tensor name
    with pytest.warns(DeprecationWarning, match=r"'model\.layers\.\*\.mlp\.up_proj' is deprecated; write "
                      r"'re:model\\\.layers\\\..\*\\\.mlp\\\.up_proj\$'"):
        g = compile_patterns(["model.layers.*.mlp.up_proj"])
    assert g.matches("model.layers.7.mlp.up_proj") and not g.matches("model.layers.7.mlp.up_proj_x")
    new = compile_patterns([glob_as_regex("model.layers.*.mlp.up_proj")])
    for m in ("model.layers.7.mlp.up_proj", "model.layers.7.mlp.up_proj_x", "model.layers.7.attn.up_proj"):
        assert new.matches(m) == g.matches(m), m
    cfg = compile_patterns(["model.visual"], where="config.json", legacy="prefix")
    with pytest.warns(DeprecationWarning, match=r"'model.visual' matches the modules below it by prefix.*"
                      r"write 're:model\\\.visual\\\.'"):
        assert cfg.matches("model.visual.blocks.0.attn.qkv")
    assert not cfg.matches("model.visualx")
    with pytest.raises(IgnorePatternError, match=r"pattern 're:\(' is not a valid regular expression") as e:
        compile_patterns(["re:("], where="ignore (output.ignore)")
    assert e.value.file == "ignore (output.ignore)" and "re:" in e.value.fix


def test_convert_ignore_takes_names_regexes_and_deprecated_globs(checkpoints):
    src = checkpoints("llama", "fp8_block")
    index = CheckpointIndex.open(src)
    adapter = get_adapter(src, index=index)

    def kept_out(ignore):
        return set(make_plan(index, adapter, "nvfp4", "modelopt", 1, ignore=ignore).ignore)

    base = kept_out([])
    ups = {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    assert not ups & base and "lm_head" in base
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings warn about nothing
        assert kept_out(["re:.*up_proj$"]) == base | ups
        assert kept_out(["model.layers.1.mlp.up_proj"]) == base | {"model.layers.1.mlp.up_proj"}
        assert kept_out(["model.layers.1.mlp.up_proj.weight"]) == base | {"model.layers.1.mlp.up_proj"}
        assert kept_out(["model.layers.1.mlp"]) == base  # exact names: a parent does not match its children
    with pytest.warns(DeprecationWarning, match=r"write 're:.*up_proj\$'"):
        assert kept_out(["*up_proj"]) == base | ups


# -- independent verification -----------------------------------------------------------------------------

def test_verify_reference_matches_the_formula(checkpoints):
    from streaming_adapters.convert.verify_reference import ReferenceReader
    from reference import reference_state_dict

    for family, fmt in (("llama", "fp8_block"), ("deepseek_v3", "fp8_block_u8"), ("qwen3_moe", "ct_group"),
                        ("ministral3", "fp8_tensor")):
        src = checkpoints(family, fmt)
        index = CheckpointIndex.open(src)
        logical = get_adapter(src, index=index).plan.logical
        want = reference_state_dict(src)
        with ReferenceReader(index) as ref:
            for name, lt in logical.items():
                if lt.scale is None:
                    continue
                got = torch.cat([ref.bf16_rows(lt, a, min(a + 7, lt.shape[0])) for a in range(0, lt.shape[0], 7)])
                assert torch.equal(got.view(torch.int16), want[name].view(torch.int16)), (family, name)


def _writers_dequantizers():
    """Every module of the package that holds numerics.fp8.dequantize_into (the writer's read path imports it
    by name; where it lives may change)."""
    return [m for n, m in list(sys.modules.items())
            if n.startswith("streaming_adapters") and getattr(m, "dequantize_into", None) is fp8.dequantize_into]


def test_verify_catches_a_numerics_bug_in_the_writer(checkpoints, tmp_path, monkeypatch):
    src = checkpoints("llama", "fp8_block")
    index = CheckpointIndex.open(src)
    downs = sorted(n for n in index.tensors if n.endswith("down_proj.weight"))
    width = index.tensors[downs[0]].shape[1]  # 200: the only FP8 weight this wide (llama fixture)
    assert sum(1 for n, t in index.tensors.items() if t.dtype == "F8_E4M3" and t.shape[-1] == width) == len(downs)

    good = tmp_path / "good"
    convert_checkpoint(src, good, target="bf16", progress=False)
    ok = verify_checkpoint(good, src)
    assert ok.ok and ok.tensors and all(t.exact for t in ok.tensors)

    real = fp8.dequantize_into

    def flipped(out, codes, *a, **kw):  # a planted bug: one value of each down_proj box off by its sign
        r = real(out, codes, *a, **kw)
        if out.shape[-1] == width and out.numel():
            out.view(-1)[0] = -out.view(-1)[0] if out.view(-1)[0] != 0 else 1.0
        return r

    targets = _writers_dequantizers()
    assert targets, "the writer's dequantizer was not found"
    for m in targets:
        monkeypatch.setattr(m, "dequantize_into", flipped)
    bad = tmp_path / "bad"
    convert_checkpoint(src, bad, target="bf16", progress=False)
    monkeypatch.undo()
    report = verify_checkpoint(bad, src)
    assert not report.ok
    assert sorted(t.name for t in report.tensors if not t.exact) == downs
    assert "NOT exact" in report.table()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_verify_decodes_an_nvfp4_source_on_its_own(checkpoints, tmp_path, fmt):
    """NVFP4 -> BF16: verify's own unpacking (E2M1 table, -0.0 for compressed-tensors' code 8) equals the
    writer's decode bit for bit, and the NVFP4 output itself verifies against its FP8 source."""
    src = checkpoints("llama", "fp8_block")
    q = tmp_path / "nvfp4"
    convert_checkpoint(src, q, target="nvfp4", format=fmt, progress=False)
    first = verify_checkpoint(q, src)
    assert first.ok and first.format == fmt and 20 < first.worst_snr_db < 40  # 4-bit weights: ~20-30 dB
    assert first.fused_groups == 6 and not first.fused_violations  # q/k/v and gate/up of 3 layers
    back = tmp_path / "bf16"
    convert_checkpoint(q, back, target="bf16", progress=False)
    report = verify_checkpoint(back, q)
    assert report.ok and report.format is None
    # q, k, v, o, gate, up of 3 layers (down_proj, K = 200, was left BF16): decoded by verify_reference
    assert sum(1 for t in report.tensors if t.kind == "bf16") == 18


def test_verify_reference_refuses_a_nan_scale_and_a_nan_code(checkpoints, tmp_path):
    import shutil
    import struct

    from streaming_adapters.errors import CorruptCheckpointError, ScaleLayoutError

    src = tmp_path / "src"
    shutil.copytree(checkpoints("llama", "fp8_block"), src)
    out = tmp_path / "out"
    convert_checkpoint(src, out, target="bf16", progress=False)
    index = CheckpointIndex.open(src)
    scale = index.tensors["model.layers.2.self_attn.o_proj.weight_scale_inv"]  # grid [3, 3]: 320 rows of 128
    with open(src / scale.file, "r+b") as f:
        f.seek(scale.begin + 4 * (2 * 3 + 1))  # block [2, 1]: in the last row chunk of a 7-row split too
        f.write(struct.pack("<f", float("nan")))
    with pytest.raises(ScaleLayoutError, match=r"scale is nan at block \[2, 1\].*verify's reference") as e:
        verify_checkpoint(out, src)
    assert e.value.tensor == scale.name and e.value.file.endswith(scale.file)
    with open(src / scale.file, "r+b") as f:
        f.seek(scale.begin + 4 * (2 * 3 + 1))
        f.write(struct.pack("<f", 1.0))
    code = index.tensors["model.layers.2.self_attn.o_proj.weight"]
    with open(src / code.file, "r+b") as f:
        f.seek(code.begin + 5)
        f.write(b"\x7f")
    with pytest.raises(CorruptCheckpointError, match=r"an FP8 code in rows 0\.\.319 is NaN") as e:
        verify_checkpoint(out, src)
    assert e.value.tensor == "model.layers.2.self_attn.o_proj.weight"
