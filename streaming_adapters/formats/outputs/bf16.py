"""``bf16``: every FP8 weight dequantized to BF16 under its own name, plain tensors copied, the source's
quantization_config removed and ``torch_dtype: bfloat16`` set (what ``from_pretrained`` loads unquantized)."""

from __future__ import annotations

from typing import Any, Mapping

from .base import OutputTarget, register_target, without_quantization


@register_target
class BF16Target(OutputTarget):
    name = "bf16"
    target = "bf16"
    quantizes = False
    description = "X.weight BF16; quantization_config removed"

    @classmethod
    def detect(cls, config: Mapping[str, Any]) -> bool:
        return not config.get("quantization_config")

    def output_files(self, source_config, ignore, w4a4=False) -> dict[str, dict[str, Any]]:
        cfg = without_quantization(source_config)
        cfg["torch_dtype"] = "bfloat16"
        return {"config.json": cfg}
