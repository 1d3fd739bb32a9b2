"""W4A4 NVFP4 bit for bit against the real producers.

The producers get the BF16 model this project dequantizes from the FP8 fixture (``target="bf16"``, itself
checked bit for bit against the reference dequantization elsewhere); ``convert_checkpoint`` gets the FP8
checkpoint.  Both calibrate on the same token ids (batch 1, no padding).  Every tensor the producer writes
(packed weights, block scales, global scales, input scales, and the BF16 embeddings / norms / lm_head) must
be byte-identical to ours, and the quantization configs equivalent.

ModelOpt runs its export on CPU here, where ``amax / 2688`` is an IEEE division; its GPU export (what this
project matches, formats.md §2.2) multiplies by fp32(1/2688).  As the W4A16 suite does, the reference is
moved to the GPU arithmetic: the two ModelOpt functions that divide by 2688 are wrapped to multiply instead
(``gpu_scale_math``), nothing else of ModelOpt is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from w4a4_runs import assert_ct_configs_equivalent, compare, llmcompressor_w4a4, load_bf16, ours


class GpuScalarDivision(TorchFunctionMode):
    """``tensor / python_number`` as CUDA computes it (``div_true_kernel_cuda`` with a CPU scalar divisor):
    ``x * (fp32(1) / fp32(b))`` in the op's fp32 math type, rather than the CPU's IEEE division.  Used only
    around ModelOpt's export, whose scales are ``amax.float() / 2688``."""

    DIVS = (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.DIVS and len(args) == 2 and not kwargs and isinstance(args[0], torch.Tensor)
                and isinstance(args[1], (int, float)) and args[0].dtype in (torch.float32, torch.bfloat16,
                                                                              torch.float16)):
            x = args[0]
            inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(args[1]), dtype=torch.float32)
            return (x.to(torch.float32) * inv).to(x.dtype)
        return func(*args, **kwargs)


def modelopt_w4a4(bf16: Path, ids: list[list[int]], out: Path) -> Path:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = load_bf16(bf16)

    def forward_loop(m):
        with torch.no_grad():
            for r in ids:
                m(torch.tensor([r]))

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    with GpuScalarDivision():
        export_hf_checkpoint(model, export_dir=str(out))
    return out


# llm-compressor as shipped, on the families where its traced graph hands the decoder layers the model's own
# causal mask.  On Mistral and Qwen3-MoE it hands them no mask at all (their model code calls the mask function
# through a local, ``mask_function(config=self.config, ...)``, so the tracer records ``self.config`` as a node
# that rebuilds the config from ``to_dict()``, which drops ``_attn_implementation``; the mask function then
# early-exits with None and the eager attention adds no mask): test_llmcompressor_mask.py proves it and runs
# both families bit for bit, against llm-compressor with that one line fixed and against our engine handed
# the same None mask.  docs/calibration.md.
# DeepSeek-V3 (create_causal_mask by name: causal) with samples of equal length: on ragged ones (24..48 tokens)
# llm-compressor 0.14.0.1 stops in layer 1 (StaticMinMaxObserver.update_statistics_from_observed: a
# tensor_group input observer there keeps per-token statistics, tokens x 32 groups, and the next sample has
# another length: "The size of tensor a (38) must match the size of tensor b (39)").
@pytest.mark.parametrize("family,ragged", [("llama", True), ("qwen3", True), ("deepseek_v3", False)],
                         ids=["llama", "qwen3", "deepseek_v3-equal-lengths"])
def test_llmcompressor_nvfp4_bit_for_bit(setup, family, ragged):
    src, bf16, ids, data, d = setup(family, ragged=ragged)
    theirs = llmcompressor_w4a4(bf16, ids, d / "llmc", moe=family in ("qwen3_moe", "deepseek_v3"))
    mine = ours(src, data, "compressed-tensors", d / "ours-ct")
    n = compare(theirs, mine)
    assert n > 0
    assert_ct_configs_equivalent(theirs, mine)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen3_moe", "deepseek_v3"])
def test_modelopt_nvfp4_bit_for_bit(setup, family):
    src, bf16, ids, data, d = setup(family)
    theirs = modelopt_w4a4(bf16, ids, d / "mo")
    mine = ours(src, data, "modelopt", d / "ours-mo")
    assert compare(theirs, mine) > 0
    ha = json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    hb = json.loads((mine / "hf_quant_config.json").read_text())["quantization"]
    assert ha["quant_algo"] == hb["quant_algo"] == "NVFP4" and ha["group_size"] == hb["group_size"]
