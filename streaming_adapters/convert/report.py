"""The conversion's report: the load report's numbers plus what was written."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..report import LoadReport, _fmt_bytes


@dataclass
class ConvertReport(LoadReport):
    output: str = ""
    target: str = ""
    format: str | None = None
    steps: int = 0
    steps_resumed: int = 0
    bytes_written: int = 0
    output_bytes: int = 0
    ignore: list[str] = field(default_factory=list)
    calibration: dict | None = None  # W4A4: tokens' sha256, per-layer timings, the input amax table

    def summary_line(self, kind: str = "convert") -> str:
        line = super().summary_line(kind=f"convert -> {self.target}{'/' + self.format if self.format else ''}")
        return (line + f" | {_fmt_bytes(self.bytes_written)} written, {self.steps} steps"
                + (f" ({self.steps_resumed} resumed)" if self.steps_resumed else ""))
