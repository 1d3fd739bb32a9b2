"""Scale-format adapters: one decorator registry keyed on ``(quant_method, layout)``.

Importing this package registers the built-in adapters (fp8 block / tensor, compressed-tensors FP8,
ModelOpt FP8, fbgemm_fp8, compressed-tensors and ModelOpt NVFP4, unquantized)."""

from .decoder import BoxDecoder
from .base import AdapterPlan, LogicalTensor, ScaleGrid, StreamingFP8StateDictAdapter, grid_shape
from .registry import get_adapter, list_adapters, register_adapter, unregister_adapter
from . import compressed_tensors, fbgemm, hf_fp8, modelopt, nvfp4_ct, nvfp4_modelopt, unquantized  # noqa: F401

__all__ = [
    "AdapterPlan", "BoxDecoder", "LogicalTensor", "ScaleGrid", "StreamingFP8StateDictAdapter", "grid_shape",
    "get_adapter", "list_adapters", "register_adapter", "unregister_adapter",
]
