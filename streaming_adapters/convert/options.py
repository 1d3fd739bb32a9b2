"""``ConvertOptions``: every option of ``convert_checkpoint`` in one validated dataclass (as torchtitan's configs).

``convert_checkpoint(src, dst, **kw)`` builds one from its keywords and hands it to the run object
(``convert/run.py``); a bad value fails here, before any file is opened, with the message the function has
always given for it (the target/format messages are ``resolve_target``'s, the calibration one the same
``CheckpointError``).  The caller gathers that error over the ranks (ranks may pass different values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibrate import run as calib
from ..calibrate.config import CalibrationConfig
from ..checkpoint.byteio import BACKENDS
from ..errors import CheckpointError
from ..formats.outputs.base import resolve_target
from ..read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES
from .plan import DEFAULT_STEP_BYTES


@dataclass
class ConvertOptions:
    """``target``: ``"bf16"`` or ``"nvfp4"``; ``format`` (nvfp4): ``"compressed-tensors"`` or ``"modelopt"``.
    ``ignore``: modules kept out of NVFP4 (exact names and ``re:`` regexes).  ``sync_every_s``: seconds
    between sync points (0 = every step).  ``calibration``: W4A4 (a ``CalibrationConfig`` or the data's path;
    normalised to a ``CalibrationConfig`` or ``None``).  The rest: docs of ``convert_checkpoint``."""

    target: str
    format: str | None = None  # noqa: A003 -- the public keyword's name
    step_bytes: int = DEFAULT_STEP_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    io_backend: str = DEFAULT_BACKEND
    ignore: list[str] | tuple[str, ...] = field(default_factory=tuple)
    overwrite: bool = False
    restart: bool = False
    device: str | torch.device = "cpu"
    sync_every_s: float = 30.0
    gpu_pipeline: bool | str = "auto"
    readers: int = 8
    progress: bool = True
    verbose: bool = False
    calibration: CalibrationConfig | str | None = None

    def __post_init__(self) -> None:
        # The checks the function made at its start (device) and when it opened its reader (io_backend,
        # gpu_pipeline: make_executor's message), then make_plan's (target/format) and the calibration one.
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.io_backend not in BACKENDS:
            raise ValueError(f"io_backend must be one of {BACKENDS}, got {self.io_backend!r}")
        if self.gpu_pipeline not in (True, False, "auto"):
            raise ValueError(f"gpu_pipeline must be True, False or 'auto', got {self.gpu_pipeline!r}")
        resolve_target(self.target, self.format)
        self.calibration = calib.as_config(self.calibration)
        if self.calibration is not None and self.target != "nvfp4":
            raise CheckpointError("calibration needs target='nvfp4'", expected="target='nvfp4' (W4A4)",
                                  fix="drop calibration, or convert to nvfp4")

