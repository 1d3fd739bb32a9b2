"""``quant_method: modelopt`` FP8 (``quant_algo: FP8``): F32 0-dim ``X.weight_scale``, hidden F32 0-dim
``X.input_scale`` and KV-cache ``k_proj.k_scale`` / ``v_proj.v_scale``.  Per-channel exports
(``FP8_PER_CHANNEL_PER_TOKEN``) store ``weight_scale`` as ``[N]`` or ``[N, 1]``; both are read."""

from __future__ import annotations

import math

from .base import StreamingFP8StateDictAdapter
from .registry import register_adapter

FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO")


def _algo(qc) -> str | None:
    qc = qc or {}
    return qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")


@register_adapter
class ModelOptFP8Adapter(StreamingFP8StateDictAdapter):
    quant_method = "modelopt"
    layout = "fp8"
    description = "ModelOpt FP8 (per-tensor weight_scale; input_scale, k_scale, v_scale hidden)"
    scale_suffixes = ("weight_scale",)
    hidden_suffixes = ("input_scale", "k_scale", "v_scale", "output_scale")

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        return _algo(quant_config) in FP8_ALGOS

    def scale_block(self, weight, scale):
        if math.prod(scale.shape) == 1:
            return tuple(weight.shape)
        return (1,) * (len(weight.shape) - 1) + (weight.shape[-1],)  # per output channel
