"""``quant_method: compressed-tensors`` with ``format: nvfp4-pack-quantized`` (llm-compressor NVFP4A16 and
NVFP4 W4A4): ``X.weight_packed`` U8 ``[N, K/2]``, ``X.weight_scale`` F8_E4M3 ``[N, K/16]``,
``X.weight_global_scale`` F32 ``[1]`` (= 2688 / amax: the decode *divides* by it), and for W4A4
``X.input_global_scale`` F32 ``[1]`` (hidden: activations only).

Decoded bit for bit as compressed-tensors 0.20's ``NVFP4PackedCompressor.decompress`` does:
``unpack_fp4_from_uint8`` (BF16 E2M1 values, code 8 = -0.0), then ``dequantize`` with the BF16 block scale
and the fp32 ``[1]`` global scale: ``scale / global_scale`` promotes to fp32, ``x_q * scale`` is one fp32
product, ``.to(bf16)`` one rounding -- ``bf16(fp32(LUT[q]) * fl(fp32(s8) / gs))``.
"""

from __future__ import annotations

from .compressed_tensors import _groups
from .nvfp4_base import NVFP4AdapterBase, nvfp4_group_ok
from .registry import register_adapter
from ..errors import UnknownFormatError

NVFP4_FORMAT = "nvfp4-pack-quantized"


@register_adapter
class CompressedTensorsNVFP4Adapter(NVFP4AdapterBase):
    quant_method = "compressed-tensors"
    layout = "nvfp4"
    description = "compressed-tensors nvfp4-pack-quantized (NVFP4A16, NVFP4 W4A4): weight_packed U8, F8_E4M3 " \
                  "block scales, weight_global_scale"
    packed_suffix = "weight_packed"
    block_scale_suffix = "weight_scale"
    global_scale_suffix = "weight_global_scale"
    scale_suffixes = ("weight_scale", "weight_global_scale")
    hidden_suffixes = ("input_global_scale", "input_scale", "output_scale", "k_scale", "v_scale",
                       "weight_zero_point", "input_zero_point")
    rule = "ct"

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        qc = quant_config or {}
        formats = {qc.get("format")} | {g.get("format") for _, g in _groups(qc)}
        return NVFP4_FORMAT in formats

    def check_config(self) -> None:
        for name, g in _groups(self.quant_config):
            fmt = g.get("format") or self.quant_config.get("format")
            if fmt == NVFP4_FORMAT and g.get("weights") is not None and not nvfp4_group_ok(g["weights"]):
                w = g["weights"]
                raise UnknownFormatError(
                    f"config group {name} says {NVFP4_FORMAT} but its weights are num_bits={w.get('num_bits')} "
                    f"type={w.get('type')} group_size={w.get('group_size')}",
                    file="config.json", tensor=f"quantization_config.config_groups.{name}",
                    expected="NVFP4 weights: num_bits 4, type float, group_size 16",
                    fix="fix quantization_config, or register an adapter for this scheme (docs/adapters.md)",
                )
