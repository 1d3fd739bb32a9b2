"""``quant_method: fp8`` (transformers FineGrainedFP8): block scales and Mistral per-tensor scales.

Block (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, MiniMax-M2, GLM): ``X.weight_scale_inv`` F32
``[ceil(N/bm), ceil(K/bn)]`` with ``weight_block_size: [bm, bn]`` from the config -- never derived from the
grid (``N // rows`` is wrong for N=576 with a 5-row grid).  UE8M0 scales (``scale_fmt: ue8m0``) come as
power-of-two F32, as ``F8_E8M0``, or as ``U8`` exponent bytes; all three decode to the same multipliers.

Per-tensor (Devstral-2-123B, Ministral-3, Mistral-Medium-3.5): ``weight_block_size: null``, a BF16 0-dim
``X.weight_scale_inv`` and a BF16 0-dim ``X.activation_scale`` (hidden; used by W8A8 kernels, not here).
Mistral-native names ``qscale_weight`` / ``qscale_act`` are read too.

Fused experts (transformers 5.25 ``finegrained_fp8.FP8Experts`` and its save path, Mistral-4): one FP8
parameter ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first) / ``down_proj`` ``[E, H, I]`` with
``<name>_scale_inv`` beside it: block scales ``[E, ceil(2I/bm), ceil(H/bn)]`` (a 3-D grid, block ``(1, bm,
bn)`` in global coordinates of the fused tensor); per-tensor scales one per expert (``[E]`` for Mistral-4,
``[E, 1, 1]`` for transformers' ``down_proj``) or one per expert *and half* for the fused gate/up
(``[E, 2, 1]``: transformers allocates ``min_sf_out=2`` rows so gate and up keep their own scale).
"""

from __future__ import annotations

import math

from .base import StreamingFP8StateDictAdapter
from .registry import register_adapter
from ..errors import ScaleLayoutError


@register_adapter
class FineGrainedFP8BlockAdapter(StreamingFP8StateDictAdapter):
    quant_method = "fp8"
    layout = "block"
    description = "HF FineGrainedFP8 block scales (weight_block_size from config; F32 / UE8M0 / U8 scales)"
    # DeepSeek-V4 names the scale `X.scale`.
    scale_suffixes = ("weight_scale_inv", "scale")
    hidden_suffixes = ("activation_scale", "input_scale")
    fused_scale_suffixes = ("_scale_inv",)
    fused_hidden_suffixes = ("_activation_scale",)

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        return bool((quant_config or {}).get("weight_block_size"))

    @property
    def block_size(self) -> tuple[int, int]:
        bs = self.quant_config.get("weight_block_size")
        # type(b) is int: JSON true/false are bools (an int subclass) and 128.5 must not become 128.
        if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(type(b) is int and b > 0 for b in bs)):
            raise ScaleLayoutError(
                f"weight_block_size {bs!r} is not two positive ints",
                file=self._config_file, tensor="quantization_config.weight_block_size",
                expected="e.g. [128, 128]", fix="fix quantization_config in config.json",
            )
        return int(bs[0]), int(bs[1])

    def scale_block(self, weight, scale):
        if len(weight.shape) < 2:
            raise ScaleLayoutError(
                f"block-quantized weight has {len(weight.shape)} dims",
                file=weight.file, tensor=weight.name, expected=">= 2 dims [.., N, K]",
                fix="this is not a block-FP8 weight; check the checkpoint",
            )
        return (1,) * (len(weight.shape) - 2) + self.block_size

    def scale_encoding(self, weight, scale):
        if scale.dtype == "U8":
            # UE8M0 exponent bytes: 2**(b - 127); the same decoding as F8_E8M0.
            return "u8_exponent"
        return super().scale_encoding(weight, scale)


@register_adapter
class FineGrainedFP8TensorAdapter(StreamingFP8StateDictAdapter):
    quant_method = "fp8"
    layout = "tensor"
    description = "HF FineGrainedFP8 per-tensor scales (Mistral: BF16 0-dim weight_scale_inv, activation_scale)"
    scale_suffixes = ("weight_scale_inv", "qscale_weight", "weight_scale")
    hidden_suffixes = ("activation_scale", "qscale_act", "input_scale")
    fused_scale_suffixes = ("_scale_inv",)
    fused_hidden_suffixes = ("_activation_scale",)

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        return not (quant_config or {}).get("weight_block_size")

    def scale_block(self, weight, scale):
        if math.prod(scale.shape) == 1:
            return tuple(weight.shape)
        # Stacked experts [E, N, K]: one scale per expert ([E], [E, 1, 1]) or per expert and fused half
        # ([E, 2, 1], gate rows then up rows, each half its own per-tensor scale).
        grid = tuple(scale.shape) + (1,) * (3 - len(scale.shape))
        if len(weight.shape) == 3 and len(scale.shape) <= 3:
            e, n, k = weight.shape
            if grid[0] == e and grid[2] == 1 and grid[1] in (1, 2) and n % grid[1] == 0:
                return (1, n // grid[1], k)
        raise ScaleLayoutError(
            f"per-tensor scale of shape {list(scale.shape)} for a weight of shape {list(weight.shape)}",
            file=scale.file, tensor=scale.name,
            expected="a 0-dim / [1] scale, or for stacked experts [E, N, K]: [E], [E, 1, 1] or [E, 2, 1] "
            "(one per fused gate/up half)",
            fix="check quantization_config (a block-scaled checkpoint needs weight_block_size) or re-export",
        )
