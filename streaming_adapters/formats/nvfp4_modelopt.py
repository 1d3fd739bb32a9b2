"""``quant_method: modelopt`` NVFP4 (``quant_algo: NVFP4`` W4A4 or ``W4A16_NVFP4``, in config.json's
``quantization_config`` or only in ``hf_quant_config.json``): ``X.weight`` U8 ``[N, K/2]``,
``X.weight_scale`` F8_E4M3 ``[N, K/16]``, ``X.weight_scale_2`` F32 ``[]`` (= amax / 2688: the decode
*multiplies* by it), W4A4 ``X.input_scale`` F32 ``[]`` (hidden); KV-cache ``k_scale`` / ``v_scale`` hidden.
Modules in ``exclude_modules`` / ``ignore`` are stored BF16 and load as they are.

Decoded bit for bit as ModelOpt 0.47's ``NVFP4QTensor.dequantize`` does: ``e2m1_values[q]`` (fp32, +0.0 at
code 8) times ``scale.float() * double_scale`` (one fp32 product per block), then one product per element
and ``.to(bf16)``: ``bf16(LUT[q] * fl(fp32(s8) * w2))``.
"""

from __future__ import annotations

from .modelopt import _algo
from .nvfp4_base import NVFP4AdapterBase
from .registry import register_adapter

NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")


@register_adapter
class ModelOptNVFP4Adapter(NVFP4AdapterBase):
    quant_method = "modelopt"
    layout = "nvfp4"
    description = "ModelOpt NVFP4 / W4A16_NVFP4: weight U8, F8_E4M3 weight_scale, weight_scale_2 (input_scale hidden)"
    packed_suffix = "weight"
    block_scale_suffix = "weight_scale"
    global_scale_suffix = "weight_scale_2"
    scale_suffixes = ("weight_scale", "weight_scale_2")
    hidden_suffixes = ("input_scale", "k_scale", "v_scale", "output_scale")
    rule = "modelopt"

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        return _algo(quant_config) in NVFP4_ALGOS
