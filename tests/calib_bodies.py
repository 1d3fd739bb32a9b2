"""Rank bodies of the distributed calibration tests (importable by name for the process pool)."""

from __future__ import annotations


def convert_w4a4(src: str, dst: str, data: str, fmt: str, samples: int, seq_len: int) -> dict:
    from streaming_adapters.calibrate import CalibrationConfig
    from streaming_adapters.convert import convert_checkpoint

    rep = convert_checkpoint(src, dst, target="nvfp4", format=fmt, progress=False, step_bytes=1 << 18,
                             calibration=CalibrationConfig(data=data, samples=samples, seq_len=seq_len))
    return rep.calibration["input_amax"]
