"""One summary line and a machine-readable report per run.

Memory is measured, not estimated: a sampler thread reads ``/proc/self/status`` (``RssAnon``: anonymous
memory, i.e. what the load allocates, excluding page-cache pages of the mapped checkpoint) every 5 ms; GPU
peaks come from ``torch.cuda.max_memory_allocated`` over the run.  ``peak_transient_bytes`` is the largest
scratch this package allocated at once (read buffer + dequantization scratch), counted at allocation.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MiB = 1 << 20


def rss_anon_of(pid: int | str = "self") -> int | None:
    """``RssAnon`` of a process in bytes (``/proc/<pid>/status``), or None if it is gone / not Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_anon_bytes() -> int:
    own = rss_anon_of("self")
    if own is None:  # not Linux: fall back to total RSS
        import psutil

        return psutil.Process().memory_info().rss
    return own


class MemoryMonitor:
    """Samples anonymous RSS in a thread, and tracks the CUDA allocator's peak, between enter and exit."""

    def __init__(self, device: torch.device | None = None, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.start_host = 0
        self.peak_host = 0
        self.start_gpu = 0
        self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryMonitor":
        self.start_host = self.peak_host = rss_anon_bytes()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start_gpu = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_host = max(self.peak_host, rss_anon_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_host = max(self.peak_host, rss_anon_bytes())
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gpu = torch.cuda.max_memory_allocated(self.device)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class RankStats:
    rank: int = 0
    tensors: int = 0
    quantized: int = 0
    plain: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    peak_transient_bytes: int = 0
    peak_host_bytes: int = 0        # anonymous RSS peak during the run
    host_bytes_at_start: int = 0
    peak_gpu_bytes: int | None = None
    gpu_bytes_at_start: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # phase split (plan_s, load_s, pipeline ...)


@dataclass
class LoadReport:
    """What a load did, on this rank and (``ranks``) on every rank of the group.

    ``str(report)`` is the one summary line; ``report.to_json()`` the machine-readable form.
    """

    checkpoint: str
    adapter: str
    world_size: int
    rank: int
    io_backend: str
    chunk_bytes: int
    tensors: int = 0
    quantized: int = 0
    plain: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    peak_transient_bytes: int = 0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int | None = None
    missing: list[str] = field(default_factory=list)
    ranks: list[RankStats] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def total_bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.ranks) if self.ranks else self.bytes_read

    @property
    def wall_seconds(self) -> float:
        return max((r.seconds for r in self.ranks), default=self.seconds)

    def summary_line(self, kind: str = "load") -> str:
        total, wall = self.total_bytes_read, self.wall_seconds
        gbps = total / wall / 1e9 if wall > 0 else 0.0
        host = max((r.peak_host_bytes - r.host_bytes_at_start for r in self.ranks), default=0)
        gpus = [r.peak_gpu_bytes for r in self.ranks if r.peak_gpu_bytes is not None]
        trans = max((r.peak_transient_bytes for r in self.ranks), default=self.peak_transient_bytes)
        return (
            f"[streaming_adapters] {kind} {self.adapter} | {self.world_size} rank(s) | "
            f"{sum(r.tensors for r in self.ranks)} tensor shards ({sum(r.quantized for r in self.ranks)} fp8) | "
            f"{_fmt_bytes(total)} read in {wall:.2f} s = {gbps:.2f} GB/s | "
            f"peak host +{_fmt_bytes(host)}/rank | peak GPU {_fmt_bytes(max(gpus) if gpus else None)}/rank | "
            f"largest transient {_fmt_bytes(trans)}"
        )

    def __str__(self) -> str:
        return self.summary_line()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = self.gb_per_s
        d["summary"] = self.summary_line()
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text
