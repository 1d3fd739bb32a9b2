"""Output formats of a conversion: one :class:`OutputTarget` per format, one decorator registry keyed on the
format name (``bf16``, ``compressed-tensors``, ``modelopt``).  Importing this package registers them."""

from .base import (DEFAULT_FORMAT, OutputTarget, OutputTensor, get_target, is_linear_weight, list_targets,
                   register_target, resolve_target, target_of_config, unregister_target, without_quantization)
from . import bf16, nvfp4  # noqa: F401 -- registers the built-in targets
from .nvfp4 import MODELOPT_VERSION, CompressedTensorsTarget, ModelOptTarget, NVFP4Target

__all__ = [
    "DEFAULT_FORMAT", "MODELOPT_VERSION", "CompressedTensorsTarget", "ModelOptTarget", "NVFP4Target", "OutputTarget",
    "OutputTensor", "get_target", "is_linear_weight", "list_targets", "register_target", "resolve_target",
    "target_of_config", "unregister_target", "without_quantization",
]
