"""The CUDA back end: disk reads, host-to-device copies and dequantization overlapped.

Every job is cut into chunks (``chunk_bytes`` of stored bytes) and each chunk goes through three stages that
run concurrently on different chunks::

    reader threads      pread of the chunk's bytes into a pinned host buffer                 (disk, page cache)
    copy stream         pinned buffer -> device staging buffer, non_blocking                 (PCIe: ~55 GB/s)
    compute stream      Triton dequant (or a copy for plain tensors) into the destination    (HBM)

``host_depth`` pinned buffers and ``depth`` device buffers form two rings; a host buffer is reused once its
H2D copy has finished (an event), a device buffer once the kernel that read it has finished.  Several
reader threads keep several reads in flight (what a cold NVMe or a network file system needs to reach its
bandwidth: one synchronous read stream got ~1/3 of the disk's 4.6 GB/s on the GPU host).

Memory (per rank): host ``host_depth x chunk`` pinned (8 x 32 MiB = 256 MiB), GPU ``depth x chunk``
staging (3 x 32 MiB = 96 MiB) plus the scale windows; nothing proportional to a tensor.  Reads are preads
into the pinned buffers whatever the backend, so a shard truncated during a load is a named error, never
SIGBUS (except many short runs under ``mmap``, below).  With ``gpu_pipeline=False`` (``make_executor``) both
rings have one slot and one reader: no overlap.  On a CPU "device" streams and events are no-ops (tests of
this logic without a GPU).
"""

from __future__ import annotations

import contextlib
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..checkpoint.byteio import runs_of_box
from ..numerics.fp8 import dequantize_into
from .boxes import Chunk, check_codes, read_scale_window, split_job
from .executor import FillExecutor, Job

DEFAULT_DEPTH = 3         # device staging slots: 3 x 32 MiB on the GPU
DEFAULT_HOST_DEPTH = 8    # pinned slots: up to 8 reads in flight (8 x 32 MiB pinned host memory)
DEFAULT_PIPELINE_CHUNK = 32 << 20
DEFAULT_READERS = 8  # 2xH200, 8 Llama-70B layers, TP=2, cold: 5.19 s with 8 readers, 5.67 s with 4


class CudaExecutor(FillExecutor):
    """Runs jobs to completion on one CUDA device, overlapping the three stages.  ``timings()``: ``read_s``
    (summed over reader threads), ``wait_read_s`` (issuing thread waiting for a read: the disk is the
    bottleneck), ``wait_copy_s`` (waiting for a host slot's H2D copy), ``issue_s`` (enqueuing), ``chunks``."""

    overlapped = True

    def __init__(self, io, device: torch.device | str, *, chunk_bytes: int = DEFAULT_PIPELINE_CHUNK,
                 depth: int = DEFAULT_DEPTH, host_depth: int = DEFAULT_HOST_DEPTH,
                 readers: int = DEFAULT_READERS) -> None:
        super().__init__(io, chunk_bytes)
        self.device = torch.device(device)
        self.depth = max(1, depth)
        self.host_depth = max(host_depth, self.depth)
        self.readers = max(1, readers)
        for k in ("read_s", "wait_read_s", "wait_copy_s", "issue_s", "chunks"):
            self.counters.timings[k] = 0.0

    def max_elems(self, itemsize: int) -> int:
        return max(1, self.chunk_bytes // itemsize)

    def _fill(self, jobs: list[Job]) -> None:
        chunks = [c for lt, s, n, t in jobs for c in split_job(lt, s, n, t, self.max_elems(lt.stored.itemsize))]
        self.run(chunks)

    def run(self, chunks: list[Chunk]) -> None:
        """Chunks already split and checked (the deprecated ``GpuPipeline.run``); :meth:`fill` is the API."""
        if not chunks:
            return
        dev = self.device
        cuda = dev.type == "cuda"
        size = max(c.nbytes for c in chunks)
        nscale = max(c.scale_elems for c in chunks)
        # Host ring (reads in flight) deeper than the device ring (copies + kernels in flight): the readers
        # must never idle while the issuing thread is busy (on the 2xH200 host, with one ring of 4 the
        # readers were busy only 55% of the load).
        n_host = min(self.host_depth, len(chunks))
        n_dev = min(self.depth, len(chunks))
        host = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(n_host)]
        devbuf = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(n_dev)]
        # Scale windows travel beside their codes: decoded to fp32 by the reader thread, copied on the copy
        # stream (a synchronous small copy would stall the host on the compute stream every chunk).
        hscale = [torch.empty(max(1, nscale), dtype=torch.float32, pin_memory=cuda) for _ in host]
        dscale = [torch.empty(max(1, nscale), dtype=torch.float32, device=dev) for _ in devbuf]
        copy_stream = torch.cuda.Stream(dev) if cuda else _NoStream()
        compute = torch.cuda.current_stream(dev) if cuda else _NoStream()
        copied = [torch.cuda.Event() if cuda else _NoEvent() for _ in host]      # H2D done: host slot free
        consumed = [torch.cuda.Event() if cuda else _NoEvent() for _ in devbuf]  # kernel done: device slot free
        free: queue.Queue[int] = queue.Queue()
        for i in range(n_host):
            free.put(i)
        self.counters.peak((n_host + n_dev) * size)
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="sa-read")
        pending: list[tuple[Chunk, int, Future]] = []
        it = iter(chunks)
        add = self.counters.add
        error: list[BaseException] = []

        def submit() -> bool:
            c = next(it, None)
            if c is None:
                return False
            slot = free.get()
            t = time.perf_counter()
            copied[slot].synchronize()  # its last H2D copy has finished reading the pinned buffer
            add("wait_copy_s", time.perf_counter() - t)
            pending.append((c, slot, pool.submit(self._read, c, host[slot], hscale[slot])))
            return True

        try:
            for _ in host:
                if not submit():
                    break
            k = 0
            while pending:
                c, slot, fut = pending.pop(0)
                t = time.perf_counter()
                window = fut.result()  # re-raises a read error here, on the calling thread
                t1 = time.perf_counter()
                add("wait_read_s", t1 - t)
                n, ns = c.nbytes, c.scale_elems
                d = k % n_dev
                k += 1
                with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
                    copy_stream.wait_event(consumed[d])  # the kernel that read devbuf[d] is done
                    devbuf[d][:n].copy_(host[slot][:n], non_blocking=True)
                    if ns:
                        dscale[d][:ns].copy_(hscale[slot][:ns], non_blocking=True)
                    copied[slot].record(copy_stream)
                compute.wait_event(copied[slot])
                self._compute(c, devbuf[d][:n], dscale[d][:ns], window)
                consumed[d].record(compute)
                add("issue_s", time.perf_counter() - t1)
                add("chunks", 1)
                free.put(slot)
                submit()
        except BaseException as e:  # noqa: BLE001 -- stop the readers, then raise
            error.append(e)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            compute.synchronize()
        if error:
            raise error[0]

    # -- stages --------------------------------------------------------------------------------------
    def _read(self, c: Chunk, buf: torch.Tensor, sbuf: torch.Tensor):
        """Reader thread: the chunk's bytes into the pinned buffer, its scale window (checked, fp32) into
        the pinned scale buffer.  Returns the window's first block index.  The GIL is released by the
        reads and copies; ``read_s`` is added under the counters' lock (threads run concurrently)."""
        t0 = time.perf_counter()
        try:
            return self._read_chunk(c, buf, sbuf)
        finally:
            self.counters.add("read_s", time.perf_counter() - t0)

    def _read_chunk(self, c: Chunk, buf: torch.Tensor, sbuf: torch.Tensor):
        info = c.lt.stored
        start, length = c.stored
        run, _, offs = runs_of_box(info.shape, start, length, info.itemsize)
        read_into = getattr(self.io, "read_into", None)  # a host-memory source (tests/test_read_core.py) has none
        if read_into is not None and (self.io.backend == "pread" or len(offs) == 1 or run >= (64 << 10)):
            # Contiguous chunks (row ranges) and long runs: preads into the pinned buffer.  On the 2xH200
            # host, copies out of an mmap into pinned memory ran at half the disk's cold read speed.
            read_into(info, start, length, buf)
        else:  # many short runs (a row-parallel shard of a narrow matrix): page-cache views, one copy
            src = self.io.read(info, start, length)
            buf[: c.nbytes].view(info.torch_dtype).view(length).copy_(src)
        if c.lt.decoder is not None:  # its own scale window (fp32-exact values) and extra (a global scale)
            window, extra = c.lt.decoder.read_scales(self.io, c.lt, c.start, c.length)
            sbuf[: window.numel()].view(window.shape).copy_(window)
            return None, tuple(window.shape), extra
        if c.lt.scale is None:
            return None
        lo, scale = read_scale_window(self.io, c, c.dst.dtype)
        check_codes(buf[: c.nbytes].view(info.torch_dtype).view(c.length), c.lt, c.start, self.io.root)
        sbuf[: scale.numel()].view(scale.shape).copy_(scale)
        return lo, tuple(scale.shape)

    def _compute(self, c: Chunk, raw: torch.Tensor, scale: torch.Tensor, window) -> None:
        src = raw.view(c.lt.stored.torch_dtype).view(c.stored[1])
        if c.lt.scale is None:
            c.dst.copy_(src, non_blocking=True)
            return
        if c.lt.decoder is not None:
            _, shape, extra = window
            c.lt.decoder.decode_into(c.dst, src, scale.view(shape), extra)
            return
        lo, shape = window
        dequantize_into(c.dst, src, scale.view(shape), c.start, c.lt.scale.block, lo)


class _NoStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NoEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass
