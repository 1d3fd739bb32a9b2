"""The runs both W4A4 producer test files compare: llm-compressor's ``oneshot``, this project's
``convert_checkpoint``, and the byte comparison of their outputs.

Two switches exist only to prove the diagnosis of llm-compressor's missing causal mask on Mistral and
Qwen3-MoE (docs/calibration.md, ``test_llmcompressor_mask.py``):

- ``llmcompressor_w4a4(..., keep_attn_implementation=True)``: the one-line fix to llm-compressor 0.14.0.1.
  Its ``SequentialTracer.create_arg`` records a ``PretrainedConfig`` argument as a node that rebuilds the
  config from ``config.to_dict()``, which drops ``_attn_implementation_internal``
  (``PretrainedConfig._remove_keys_not_serialized``); the fix adds ``attn_implementation=`` (the value at
  trace time, ``"eager"`` under ``calibration_forward_context``) to that node.  Nothing else is touched.
- ``ours(..., layer_mask_none=True)``: our engine handed the mask llm-compressor's graph hands the decoder
  layers there (``None``), in place of the causal one; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from helpers import assert_bit_equal
from reference import load_all as read_all
from streaming_adapters.calibrate import CalibrationConfig
from streaming_adapters.convert import convert_checkpoint

SAMPLES, SEQ_LEN = 6, 48
ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
        "ministral3": "Ministral3ForCausalLM", "mixtral": "MixtralForCausalLM"}


def load_bf16(bf16: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16, **kw)


@contextlib.contextmanager
def tracer_keeps_attn_implementation():
    """llm-compressor's ``SequentialTracer`` with the config node carrying ``attn_implementation`` (see the
    module docstring): the rebuilt config then makes the same mask as the model's own."""
    from transformers.configuration_utils import PretrainedConfig

    from llmcompressor.pipelines.sequential.helpers import SequentialTracer

    orig = SequentialTracer.create_arg

    def create_arg(self, a):
        node = orig(self, a)
        if isinstance(a, PretrainedConfig):
            node.kwargs = {**node.kwargs, "attn_implementation": a._attn_implementation}
        return node

    SequentialTracer.create_arg = create_arg
    try:
        yield
    finally:
        SequentialTracer.create_arg = orig


def llmcompressor_w4a4(bf16: Path, ids: list[list[int]], out: Path, moe: bool = False,
                       keep_attn_implementation: bool = False) -> Path:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoTokenizer

    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    model = load_bf16(bf16)
    if moe:  # experts linearized after loading (load_quantizable_moe needs torchvision); every expert sees
        # every token (moe_calibrate_all_experts, the default)
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    ignore = ["lm_head", "re:.*mlp.gate$"] if moe else ["lm_head"]
    with tracer_keeps_attn_implementation() if keep_attn_implementation else contextlib.nullcontext():
        oneshot(model=model, processor=AutoTokenizer.from_pretrained(str(bf16)), dataset=ds,
                recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=ignore),
                num_calibration_samples=len(ids), max_seq_length=SEQ_LEN)
    model.save_pretrained(str(out), save_compressed=True)
    return out


@contextlib.contextmanager
def layers_get_no_mask():
    """Our engine's decoder layers get ``attention_mask=None`` (what llm-compressor hands them on Mistral /
    Qwen3-MoE); the other layer kwargs (rotary cos/sin, position ids) are the engine's own."""
    from streaming_adapters.calibrate.skeleton import Skeleton

    orig = Skeleton.layer_kwargs

    def layer_kwargs(self, seq_len):
        return {**orig(self, seq_len), "attention_mask": None}

    Skeleton.layer_kwargs = layer_kwargs
    try:
        yield
    finally:
        Skeleton.layer_kwargs = orig


def ours(src: Path, data: Path, fmt: str, out: Path, layer_mask_none: bool = False) -> Path:
    with layers_get_no_mask() if layer_mask_none else contextlib.nullcontext():
        convert_checkpoint(src, out, target="nvfp4", format=fmt, progress=False,
                           calibration=CalibrationConfig(data=str(data), samples=SAMPLES, seq_len=SEQ_LEN))
    return out


def compare(theirs: Path, mine: Path) -> int:
    a, b = read_all(theirs), read_all(mine)
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    # every quantized Linear (one global scale each) has its input scale
    n = sum(k.endswith(("input_global_scale", "input_scale")) for k in a)
    assert n > 0 and n == sum(k.endswith(("weight_global_scale", "weight_scale_2")) for k in a)
    for k in sorted(a):
        want = a[k].reshape(b[k].shape) if a[k].numel() == b[k].numel() else a[k]
        got = b[k]
        if want.dtype == torch.bfloat16 and got.dtype == torch.float32 and k.endswith(".mlp.gate.weight"):
            # DeepSeek-V3's router is F32 in the FP8 checkpoint; we copy it as stored, the producer saves the
            # BF16 model it was given.  Compared after the same rounding (an unquantized tensor).
            got = got.to(torch.bfloat16)
        assert_bit_equal(got, want, k)
    return len(a)


def assert_ct_configs_equivalent(theirs: Path, mine: Path) -> tuple[dict, dict]:
    """llm-compressor's and our compressed-tensors ``quantization_config``: the same weights and
    input_activations blocks, ignore list and format.  Returns both for further checks."""
    qa = json.loads((theirs / "config.json").read_text())["quantization_config"]
    qb = json.loads((mine / "config.json").read_text())["quantization_config"]
    assert qa["config_groups"]["group_0"]["input_activations"] == qb["config_groups"]["group_0"]["input_activations"]
    assert qa["config_groups"]["group_0"]["weights"] == qb["config_groups"]["group_0"]["weights"]
    assert sorted(qa["ignore"]) == sorted(qb["ignore"]) and qa["format"] == qb["format"]
    return qa, qb
