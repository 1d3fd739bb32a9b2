"""Read a box ``[start, start + length)`` of a stored tensor, touching only its bytes.

Backends:

* ``pread`` (the default, every entry point): ``os.preadv`` of each contiguous run of the box into one
  buffer (the CPU executor's one reusable staging buffer, or a pinned one for host-to-device copies), with
  ``POSIX_FADV_RANDOM`` so the kernel does not read ahead: ranks on different nodes do not pay for bytes they
  do not use (measured on the GPU host: a 294 MiB TP shard became ~850 MiB of disk reads with mmap
  readahead; formats.md §1.2).  A file that shrinks under a load ends a read early: a named
  ``CorruptCheckpointError``, never a signal.
* ``mmap`` (selectable): a private mapping of the file; a box is a strided *view* into the page cache, so
  reading costs no anonymous memory at all -- the numerics read the codes in place.  Touching a page past the
  end of a file that shrank after it was mapped kills the process with SIGBUS, so every read first re-checks
  the file's size with ``fstat`` on the mapped descriptor (2 us measured, per box: a chunk of up to 64 MiB)
  and refuses a box past the current end with a named error.  What remains is a shrink *during* the one box
  being read (truncating a shard under a running load): under ``mmap`` that CAN still be SIGBUS, which is
  why ``pread`` is the default.

A box of a row-major tensor is ``prod(length[:d])`` runs of ``length[d] * prod(shape[d+1:])`` elements,
``d`` being the outermost dim after which the box spans whole rows.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
from pathlib import Path

import torch

from .index import TensorInfo

BACKENDS = ("mmap", "pread")
DEFAULT_BACKEND = "pread"  # a shard truncated during a load is a named error, never SIGBUS (see above)


def runs_of_box(
    shape: tuple[int, ...], start: tuple[int, ...], length: tuple[int, ...], itemsize: int
) -> tuple[int, int, list[int]]:
    """``(run_bytes, stride_bytes, run_offsets)``: the box as contiguous runs, offsets relative to the
    tensor's first byte.  ``stride_bytes`` is unused when there is one run."""
    nd = len(shape)
    if nd == 0:  # a 0-dim tensor (a per-tensor scale): one run of one element
        return itemsize, itemsize, [0]
    d = nd - 1
    while d > 0 and start[d] == 0 and length[d] == shape[d]:
        d -= 1
    inner = math.prod(shape[d + 1:]) * itemsize
    run = length[d] * inner
    # Offsets of every run: iterate over the outer index space length[:d].
    strides = [math.prod(shape[i + 1:]) * itemsize for i in range(nd)]
    base = sum(s * st for s, st in zip(start, strides))
    offs = [base]
    for i in range(d - 1, -1, -1):
        offs = [o + k * strides[i] for k in range(length[i]) for o in offs] if length[i] else []
    offs.sort()
    return run, strides[d - 1] if d > 0 else run, offs


class BoxReader:
    """Per-load reader of tensor boxes.  Thread-safe for reads of different boxes."""

    def __init__(self, root: Path, backend: str = DEFAULT_BACKEND, *, advise_random: bool | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"io_backend must be one of {BACKENDS}, got {backend!r}")
        self.root = Path(root)
        self.backend = backend
        self.advise_random = backend == "pread" if advise_random is None else advise_random
        self._maps: dict[str, torch.Tensor] = {}
        self._mms: dict[str, mmap.mmap] = {}
        self._mfds: dict[str, int] = {}  # the mapped files' descriptors, for the size re-check
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    # -- public ------------------------------------------------------------------------------------
    def read(
        self,
        info: TensorInfo,
        start: tuple[int, ...] | None = None,
        length: tuple[int, ...] | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The box as a CPU tensor of ``info``'s dtype with shape ``length``.  ``mmap``: a view (may be
        strided); ``pread``: a contiguous tensor, written into ``out`` (uint8, >= box bytes) if given."""
        shape = info.shape
        start = tuple(start) if start is not None else (0,) * len(shape)
        length = tuple(length) if length is not None else shape
        nbytes = math.prod(length) * info.itemsize
        with self._lock:
            self.bytes_read += nbytes
        if self.backend == "mmap":
            return self._read_mmap(info, start, length)
        return self._read_pread(info, start, length, nbytes, out)

    def read_into(self, info: TensorInfo, start: tuple[int, ...], length: tuple[int, ...], out: torch.Tensor) -> None:
        """``pread`` a box into ``out`` (a contiguous uint8 buffer, e.g. pinned) whatever the backend: a
        reader thread then issues plain syscalls (GIL released, one thread, the kernel's readahead as the
        backend sets it) instead of faulting pages of a mapping in through a copy."""
        nbytes = math.prod(length) * info.itemsize
        with self._lock:
            self.bytes_read += nbytes
        self._read_pread(info, tuple(start), tuple(length), nbytes, out)

    def prefetch(self, info: TensorInfo, start: tuple[int, ...], length: tuple[int, ...]) -> None:
        """Ask the kernel to start reading a box now (``MADV_WILLNEED`` / ``POSIX_FADV_WILLNEED``), so the
        disk works while the CPU or GPU is busy with the previous box.  Only the box's span is named:
        dense boxes (row ranges) as one range, strided ones run by run."""
        run, _, offs = runs_of_box(info.shape, start, length, info.itemsize)
        if not offs or run == 0:
            return
        page = mmap.PAGESIZE
        ranges = [(offs[0], offs[-1] + run)] if (offs[-1] + run - offs[0]) <= 2 * run * len(offs) else \
            [(o, o + run) for o in offs]
        if self.backend == "mmap":
            self._file_tensor(info.file)  # make sure the mapping exists
            mm = self._mms[info.file]
            if len(mm) < info.end:
                return  # the file shrank before it was mapped: the read itself names the error
            for a, b in ranges[:4096]:
                lo = (info.begin + a) // page * page
                try:
                    mm.madvise(mmap.MADV_WILLNEED, lo, info.begin + b - lo)
                except (OSError, ValueError):
                    return
        elif hasattr(os, "posix_fadvise"):
            fd = self._fd(info.file)
            for a, b in ranges[:4096]:
                os.posix_fadvise(fd, info.begin + a, b - a, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        self._maps.clear()
        for mm in self._mms.values():
            try:
                mm.close()
            except BufferError:  # a view still alive; the mapping goes when it does
                pass
        self._mms.clear()
        for fd in [*self._fds.values(), *self._mfds.values()]:
            os.close(fd)
        self._fds.clear()
        self._mfds.clear()

    def __enter__(self) -> "BoxReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backends ----------------------------------------------------------------------------------
    def _file_tensor(self, rel: str) -> torch.Tensor:
        with self._lock:
            t = self._maps.get(rel)
            if t is None:
                fd = -1
                try:
                    fd = os.open(self.root / rel, os.O_RDONLY)
                    # ACCESS_COPY: private and writable from Python's view, so torch.frombuffer does not
                    # warn; nothing is ever written, so no page is copied.
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:  # a vanished file, or one emptied since its header was read
                    if fd >= 0:
                        os.close(fd)
                    raise _shrunk(self.root / rel, None, 0, f"cannot be mapped ({e})") from None
                self._mfds[rel] = fd
                if self.advise_random and hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_RANDOM)
                self._mms[rel] = mm
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = torch.frombuffer(mm, dtype=torch.uint8)
                self._maps[rel] = t
            return t

    def _check_size(self, info: TensorInfo) -> None:
        """The file still holds the tensor and the mapping covers it: touching a mapped page past the end
        of the file would be SIGBUS, not an exception."""
        size = os.fstat(self._mfds[info.file]).st_size
        if size < info.end or len(self._mms[info.file]) < info.end:
            raise _shrunk(self.root / info.file, info.name, info.end,
                          f"is {min(size, len(self._mms[info.file]))} bytes now")

    def _read_mmap(self, info, start, length) -> torch.Tensor:
        ft = self._file_tensor(info.file)
        self._check_size(info)
        raw = ft[info.begin:info.end]
        if info.itemsize > 1 and info.begin % info.itemsize:
            raw = raw.clone()  # unaligned data offset: a dtype view needs alignment
        t = raw.view(info.torch_dtype).view(info.shape) if info.shape else raw.view(info.torch_dtype).view(())
        for dim, (s, n) in enumerate(zip(start, length)):
            if s != 0 or n != info.shape[dim]:
                t = t.narrow(dim, s, n)
        return t

    def _fd(self, rel: str) -> int:
        with self._lock:
            fd = self._fds.get(rel)
            if fd is None:
                fd = os.open(self.root / rel, os.O_RDONLY)
                if self.advise_random and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[rel] = fd
            return fd

    def _read_pread(self, info, start, length, nbytes, out) -> torch.Tensor:
        if out is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            if out.dtype != torch.uint8 or out.numel() < nbytes or not out.is_contiguous():
                raise ValueError("pread staging buffer must be a contiguous uint8 tensor of >= box bytes")
            buf = out[:nbytes]
        if nbytes:
            fd = self._fd(info.file)
            mv = memoryview(buf.numpy()).cast("B")
            run, _, offs = runs_of_box(info.shape, start, length, info.itemsize)
            pos = 0
            for off in offs:
                _pread_full(fd, mv[pos:pos + run], info.begin + off, self.root / info.file, info.name)
                pos += run
        return buf.view(info.torch_dtype).view(length)


def _shrunk(path: Path, name: str | None, end: int, now: str):
    from ..errors import CorruptCheckpointError

    return CorruptCheckpointError(
        f"file {now}: it changed or was truncated during the load",
        file=str(path), tensor=name, expected=f"at least {end} bytes, as when its header was read",
        fix="do not modify a checkpoint while it is loaded; re-download it and load again",
    )


def _pread_full(fd: int, dst: memoryview, offset: int, path: Path, name: str) -> None:
    got = 0
    while got < len(dst):
        n = os.preadv(fd, [dst[got:]], offset + got)
        if n <= 0:
            from ..errors import CorruptCheckpointError

            raise CorruptCheckpointError(
                f"file ended after {offset + got} bytes while reading a tensor (truncated while loading?)",
                file=str(path), tensor=name, expected=f"{len(dst)} bytes at offset {offset}",
                fix="the file changed or was truncated during the load; re-download it",
            )
        got += n
