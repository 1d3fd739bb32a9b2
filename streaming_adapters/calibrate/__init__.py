"""W4A4 NVFP4: calibrate activation scales layer by layer, streaming from the FP8 checkpoint.

Stages, one module each: ``data`` (calibration tokens) -> ``skeleton`` (the transformers model on meta;
``moe`` linearizes fused experts) -> ``engine`` (the per-layer loop: fill, run with hooks, keep the
unquantized outputs, free; ``store`` holds the hidden states) -> ``scales`` (amax -> each format's input
scale).  ``run`` hooks it into ``convert_checkpoint(..., calibration=...)``, which writes the weights exactly
as W4A16 does and adds the input scales from the table; ``plan`` sizes it, ``verify`` checks the output.
"""

from .config import CalibrationConfig
from .data import CalibrationTokens, load_calibration_tokens

__all__ = ["CalibrationConfig", "CalibrationTokens", "load_calibration_tokens"]
