"""FP8 -> BF16 conversion (world size 1): exact values, a normal HF checkpoint, crash-safety rules.
(World sizes 2 and 4: test_dist_2.py / test_dist_4.py; SIGKILL + resume: test_convert_resume.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_bit_equal
from reference import load_all, reference_state_dict
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.convert.staging import OutputExistsError


@pytest.mark.parametrize("family,fmt", [("llama", "fp8_block"), ("deepseek_v3", "fp8_block_u8"),
                                        ("qwen3_moe", "ct_group"), ("ministral3", "fp8_tensor"), ("qwen3", "modelopt")])
def test_bf16_output_is_the_exact_dequantization(checkpoints, tmp_path, family, fmt):
    src = checkpoints(family, fmt)
    dst = tmp_path / "out"
    report = convert_checkpoint(src, dst, target="bf16", step_bytes=1 << 18, chunk_bytes=1 << 16, progress=False)
    ref = reference_state_dict(src)
    got = load_all(dst)
    assert sorted(got) == sorted(ref), "same tensor names minus scales"
    for k in ref:
        assert_bit_equal(got[k], ref[k], k)
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert not (dst / "hf_quant_config.json").exists()
    assert (dst / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    assert report.steps > 3 and report.bytes_written == sum(v.numel() * v.element_size() for v in ref.values())
    assert not (dst.parent / "out.partial").exists()


def test_bf16_output_loads_in_transformers(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    src = checkpoints("llama", "fp8_block")
    convert_checkpoint(src, tmp_path / "out", target="bf16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    ref = reference_state_dict(src)
    for name, p in model.named_parameters():
        assert_bit_equal(p.data, ref[name], name)


def test_refuses_to_overwrite_a_complete_output(checkpoints, tmp_path):
    src = checkpoints("llama", "fp8_block")
    dst = tmp_path / "out"
    convert_checkpoint(src, dst, target="bf16", progress=False)
    before = (dst / "model-00001-of-00003.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_checkpoint(src, dst, target="bf16", progress=False)
    assert (dst / "model-00001-of-00003.safetensors").read_bytes() == before
    report = convert_checkpoint(src, dst, target="bf16", progress=False, overwrite=True)
    assert report.steps_resumed == 0 and (dst / "model-00001-of-00003.safetensors").read_bytes() == before
    assert not (tmp_path / "out.old").exists()


def test_unfinished_staging_from_other_inputs_is_refused(checkpoints, tmp_path):
    a, b = checkpoints("llama", "fp8_block"), checkpoints("qwen3", "fp8_block")
    dst = tmp_path / "out"
    from streaming_adapters.checkpoint import CheckpointIndex
    from streaming_adapters.convert.plan import make_plan
    from streaming_adapters.convert.staging import StagedOutput
    from streaming_adapters.formats import get_adapter

    idx = CheckpointIndex.open(a)
    StagedOutput(dst, make_plan(idx, get_adapter(a, index=idx), "bf16", None, 1)).prepare(overwrite=False, restart=False)
    with pytest.raises(Exception, match="different inputs"):
        convert_checkpoint(b, dst, target="bf16", progress=False)
    convert_checkpoint(b, dst, target="bf16", progress=False, restart=True)
    assert (dst / "config.json").exists()
