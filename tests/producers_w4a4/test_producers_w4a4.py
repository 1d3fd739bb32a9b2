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
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from calib_fixtures import random_ids, write_jsonl, write_tokenizer
from helpers import assert_bit_equal
from streaming_adapters.calibrate import CalibrationConfig
from streaming_adapters.convert import convert_checkpoint

SAMPLES, SEQ_LEN = 6, 48
NUM_LAYERS = 3  # the Llama fixture's
ARCH = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    def make(family: str):
        # intermediate 208: FP8 blocks cut inside (208 % 128 != 0) but every Linear NVFP4-able (208 % 16 == 0)
        src = checkpoints(family, "fp8_block", intermediate_size=208)
        d = tmp_path_factory.mktemp(f"prod-{family}")
        bf16 = d / "bf16"
        convert_checkpoint(src, bf16, target="bf16", progress=False)
        cfg = json.loads((bf16 / "config.json").read_text())
        cfg["architectures"] = [ARCH[family]]  # from_pretrained picks the class by it
        (bf16 / "config.json").write_text(json.dumps(cfg))
        write_tokenizer(bf16)
        ids = random_ids(SAMPLES, SEQ_LEN, seed=7)
        data = write_jsonl(d / "ids.jsonl", [{"input_ids": r} for r in ids])
        return src, bf16, ids, data, d

    return make


def load_bf16(bf16: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16)


def llmcompressor_w4a4(bf16: Path, ids: list[list[int]], out: Path) -> Path:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoTokenizer

    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    model = load_bf16(bf16)
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(str(bf16)), dataset=ds,
            recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
            num_calibration_samples=len(ids), max_seq_length=SEQ_LEN)
    model.save_pretrained(str(out), save_compressed=True)
    return out


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


def ours(src: Path, data: Path, fmt: str, out: Path) -> Path:
    convert_checkpoint(src, out, target="nvfp4", format=fmt, progress=False,
                       calibration=CalibrationConfig(data=str(data), samples=SAMPLES, seq_len=SEQ_LEN))
    return out


def compare(theirs: Path, mine: Path) -> int:
    a, b = read_all(theirs), read_all(mine)
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    # q k v o gate up down in each layer: 7 Linears x layers, each with its input scale
    assert sum(k.endswith(("input_global_scale", "input_scale")) for k in a) == 7 * NUM_LAYERS
    for k in sorted(a):
        want = a[k].reshape(b[k].shape) if a[k].numel() == b[k].numel() else a[k]
        assert_bit_equal(b[k], want.to(b[k].dtype) if want.dtype != b[k].dtype and want.dtype == torch.uint8 else want, k)
    return len(a)


@pytest.mark.parametrize("family", ["llama"])
def test_llmcompressor_nvfp4_bit_for_bit(setup, family):
    src, bf16, ids, data, d = setup(family)
    theirs = llmcompressor_w4a4(bf16, ids, d / "llmc")
    mine = ours(src, data, "compressed-tensors", d / "ours-ct")
    n = compare(theirs, mine)
    assert n > 0
    qa = json.loads((theirs / "config.json").read_text())["quantization_config"]
    qb = json.loads((mine / "config.json").read_text())["quantization_config"]
    assert qa["config_groups"]["group_0"]["input_activations"] == qb["config_groups"]["group_0"]["input_activations"]
    assert qa["config_groups"]["group_0"]["weights"] == qb["config_groups"]["group_0"]["weights"]
    assert sorted(qa["ignore"]) == sorted(qb["ignore"]) and qa["format"] == qb["format"]


@pytest.mark.parametrize("family", ["llama"])
def test_modelopt_nvfp4_bit_for_bit(setup, family):
    src, bf16, ids, data, d = setup(family)
    theirs = modelopt_w4a4(bf16, ids, d / "mo")
    mine = ours(src, data, "modelopt", d / "ours-mo")
    assert compare(theirs, mine) > 0
    ha = json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    hb = json.loads((mine / "hf_quant_config.json").read_text())["quantization"]
    assert ha["quant_algo"] == hb["quant_algo"] == "NVFP4" and ha["group_size"] == hb["group_size"]
