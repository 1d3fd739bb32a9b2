"""Streaming conversion: FP8 -> BF16 and FP8 -> NVFP4 checkpoints (plan, stage, execute, verify)."""

from .engine import convert_checkpoint
from .report import ConvertReport

__all__ = ["ConvertReport", "convert_checkpoint"]
