"""No ``quantization_config``: a plain BF16 / F32 checkpoint."""

from __future__ import annotations

from .base import StreamingFP8StateDictAdapter
from .registry import register_adapter


@register_adapter
class UnquantizedAdapter(StreamingFP8StateDictAdapter):
    """No ``quantization_config``: every tensor loads as stored.  An FP8 tensor here has no scale and
    fails loudly instead of being cast."""

    quant_method = None
    layout = "unquantized"
    description = "no quantization_config: plain BF16/F32 tensors"
    scale_suffixes = ()
