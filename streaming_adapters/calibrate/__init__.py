"""W4A4 NVFP4: calibrate activation scales layer by layer, streaming from the FP8 checkpoint.

Stages, one module each: ``data`` (calibration tokens) -> ``skeleton`` (the transformers model on meta)
-> ``engine`` (the per-layer loop: fill, run with hooks, keep the unquantized outputs, free) ->
``scales`` (amax -> each format's input scale).  ``convert_checkpoint(..., calibration=...)`` writes the
weights exactly as W4A16 does and adds the input scales from the table the engine returns.
"""

from .config import CalibrationConfig
from .data import CalibrationTokens, load_calibration_tokens

__all__ = ["CalibrationConfig", "CalibrationTokens", "load_calibration_tokens"]
