"""The hidden states of a rank's calibration samples between decoder layers: host memory or a spill file.

All samples of the rank live in one flat BF16 buffer ``[tokens, hidden]`` (sample ``j`` at rows
``offsets[j] .. offsets[j+1]``).  Within ``budget_bytes`` it is one host tensor (pinned when the layers run on
a GPU, for fast H2D/D2H) overwritten in place: a sample's layer output replaces its input, which no later
sample of the layer reads.  Beyond the budget it is two memory-mapped files in ``work_dir``: layer ``i``
reads one and writes the other (``advance`` swaps them), so the page cache, not the process, holds what
does not fit, and the previous layer's outputs stay intact on disk until the next layer has finished.

Memory: ``tokens x hidden x 2`` bytes of host memory when in budget (512 x 2048 x 12288 x 2 = 24 GiB at
Mistral-Large dims with the defaults); else the page cache's share of the spill files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class HiddenStore:
    def __init__(self, lengths: list[int], hidden: int, *, budget_bytes: int, work_dir: str | Path | None,
                 pin: bool = False, tag: str = "rank0", resume_src: int | None = None) -> None:
        """``resume_src`` (spilled only): reopen the existing files, the inputs of the next layer in file
        ``resume_src`` (see :attr:`src_index`), instead of creating them."""
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.hidden = hidden
        self.nbytes = self.offsets[-1] * hidden * 2
        self.spilled = self.nbytes > budget_bytes
        self.files: list[Path] = []
        # Pinned rows of a GPU run take their layer outputs asynchronously (see ``write``).
        self._async = pin and not self.spilled
        self.pinned = self._async  # rows in page-locked host memory (calibrate.forward overlaps their copies)
        if not self.spilled:
            self._src = torch.empty(self.offsets[-1], hidden, dtype=torch.bfloat16, pin_memory=pin)
            self._dst = self._src
            return
        if work_dir is None:
            raise ValueError("hidden states exceed the host budget and no work folder was given")
        d = Path(work_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.files = [d / f"hidden-{tag}-{k}.bin" for k in (0, 1)]
        if resume_src is None or any(not f.exists() or f.stat().st_size != max(self.nbytes, 2) for f in self.files):
            resume_src = None
            for f in self.files:
                with open(f, "wb") as fh:
                    fh.truncate(max(self.nbytes, 2))
        self.resumed = resume_src is not None
        self._maps = [torch.from_file(str(f), shared=True, size=max(self.offsets[-1] * hidden, 1),
                                      dtype=torch.bfloat16)[: self.offsets[-1] * hidden].view(-1, hidden)
                      for f in self.files]
        self._src, self._dst = self._maps if not resume_src else self._maps[::-1]

    resumed = False

    def save(self, path: Path) -> None:
        """In-memory rows (the next layer's inputs) to ``path``, durably: written beside, fsynced, renamed in."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        raw = self._src.reshape(-1).view(torch.uint8).numpy()
        with open(tmp, "wb") as fh:
            for a in range(0, raw.size, 256 << 20):  # 256 MiB writes: no second copy of 24 GiB in memory
                fh.write(memoryview(raw[a: a + (256 << 20)]))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self, path: Path) -> bool:
        """Rows saved by :meth:`save` back into memory; False (nothing read) if the file is not of this size."""
        try:
            if path.stat().st_size != self.nbytes or self.spilled:
                return False
            raw = self._src.reshape(-1).view(torch.uint8).numpy()
            with open(path, "rb") as fh:
                got = 0
                while got < raw.size:
                    n = fh.readinto(memoryview(raw[got:]))
                    if not n:
                        return False
                    got += n
        except OSError:
            return False
        self.resumed = True
        return True

    @property
    def src_index(self) -> int:
        """Which spill file holds the next layer's inputs (the resume point's)."""
        return 0 if not self.spilled or self._src is self._maps[0] else 1

    def sync(self) -> None:
        """Make the spill files durable (a kill of the process alone loses nothing: the page cache keeps them)."""
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, j: int) -> torch.Tensor:
        return self._src[self.offsets[j]: self.offsets[j + 1]]

    def write(self, j: int, x: torch.Tensor) -> None:
        # Into pinned rows the copy is queued on the stream behind the layer's kernels, so Python launches the
        # next sample while the GPU works: a blocking copy per sample left the GPU idle (a Mistral-Large layer,
        # 512 x 2048 tokens on an H200: 8.7 s against a 5.4 s floor, 2026-12-06).  Stream order keeps it
        # safe when source and destination are the same rows: sample j's input was copied to the device
        # before its output overwrites them; ``advance`` waits for every queued copy.
        self._dst[self.offsets[j]: self.offsets[j + 1]].copy_(x, non_blocking=self._async and x.is_cuda)

    def advance(self) -> None:
        """After a layer: its outputs become the next layer's inputs (every queued copy finished)."""
        if self._async:  # pinned rows exist only on a GPU run
            torch.cuda.synchronize()
        if self.spilled:
            self._src, self._dst = self._dst, self._src

    def close(self) -> None:
        self._src = self._dst = None  # type: ignore[assignment]
        self._maps = []
        for f in self.files:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
