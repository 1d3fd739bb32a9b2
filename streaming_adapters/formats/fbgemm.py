"""``quant_method: fbgemm_fp8``: per-row F32 ``X.weight_scale [N, 1]``."""

from __future__ import annotations

from .base import StreamingFP8StateDictAdapter
from .registry import register_adapter


@register_adapter
class FbgemmFP8Adapter(StreamingFP8StateDictAdapter):
    quant_method = "fbgemm_fp8"
    layout = "channel"
    description = "fbgemm_fp8 per-row scales (weight_scale F32 [N, 1])"
    scale_suffixes = ("weight_scale",)
    hidden_suffixes = ("input_scale_ub",)

    def scale_block(self, weight, scale):
        return (1,) * (len(weight.shape) - 1) + (weight.shape[-1],)
