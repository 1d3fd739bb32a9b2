"""The read core (streaming_adapters/read): the default backend turns a shard truncated under a running load
into a named error (never SIGBUS), the CPU executor stages pread codes in one reused buffer, the factory picks
the back end, and the deprecated BoxFiller / GpuPipeline fronts still fill the same bytes."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import streaming_adapters as sa
from streaming_adapters.checkpoint.byteio import DEFAULT_BACKEND, BoxReader
from streaming_adapters.formats import get_adapter
from streaming_adapters.read import CpuExecutor, CudaExecutor, FillCounters, make_executor

from helpers import assert_bit_equal, poisoned_like
from reference import reference_state_dict

REPO = Path(__file__).resolve().parents[1]

BODY = r'''
import os, signal, sys, torch
import streaming_adapters as sa
from streaming_adapters.formats import get_adapter

path, backend = sys.argv[1], sys.argv[2]
ends = {f: int(e) for f, e in (a.split("=") for a in sys.argv[3:])}

def truncate(*_):  # every shard cut back to its header: whatever is read next is gone
    for f, end in ends.items():
        os.truncate(os.path.join(path, f), end)

signal.signal(signal.SIGUSR1, truncate)
lts = get_adapter(path).plan.logical
sd = {k: torch.empty(lt.shape, dtype=torch.bfloat16 if lt.scale is not None else lt.dtype) for k, lt in lts.items()}
kw = {} if backend == "default" else {"io_backend": backend}
try:
    sa.load_fp8_state_dict(sd, path, chunk_bytes=1 << 16, **kw)
except sa.CheckpointError as e:
    print(f"ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
print("finished", flush=True)
'''


def _header_ends(path: Path) -> dict[str, int]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as g:
            out[f.name] = 8 + struct.unpack("<Q", g.read(8))[0]
    return out


def _load_truncated(src: Path, tmp_path: Path, backend: str) -> subprocess.CompletedProcess:
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)  # the session fixture stays whole
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
               STREAMING_ADAPTERS_TEST_KILL_AT="read-chunk@1:USR1")  # after the first chunk's codes are read
    args = [f"{f}={e}" for f, e in _header_ends(path).items()]
    return subprocess.run([sys.executable, "-c", BODY, str(path), backend, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_default_backend_turns_a_shard_truncated_mid_load_into_a_named_error(checkpoints, tmp_path):
    assert DEFAULT_BACKEND == "pread"
    p = _load_truncated(checkpoints("llama", "fp8_block"), tmp_path, "default")
    assert p.returncode == 3, (p.returncode, p.stdout, p.stderr[-2000:])  # not -7 (SIGBUS), not a traceback
    err = p.stderr
    assert "ERROR CorruptCheckpointError" in err, err[-2000:]
    assert ".safetensors" in err and "truncated" in err and "re-download" in err, err[-2000:]


def test_mmap_still_selectable_and_refuses_a_file_truncated_before_a_read(checkpoints, tmp_path):
    """Under mmap a shard cut *during* a chunk can be SIGBUS (documented); one cut before a box is read is
    caught by the size re-check and named."""
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama", "fp8_block"), path)
    lt = next(lt for lt in get_adapter(path).plan.logical.values() if lt.scale is not None)
    with BoxReader(path, "mmap") as io:
        ex = make_executor(io, "cpu")
        ex.fill([(lt, (0, 0), tuple(lt.shape), torch.empty(lt.shape, dtype=torch.bfloat16))])
        os.truncate(path / lt.stored.file, _header_ends(path)[lt.stored.file])
        with pytest.raises(sa.CheckpointError) as e:
            ex.fill([(lt, (0, 0), tuple(lt.shape), torch.empty(lt.shape, dtype=torch.bfloat16))])
    assert lt.stored.file in str(e.value) and "truncated" in str(e.value)


def test_cpu_pread_stages_codes_in_one_reused_buffer(checkpoints):
    path = checkpoints("llama", "fp8_block")
    ref = reference_state_dict(path)
    logical = get_adapter(path).plan.logical
    chunk = 1 << 16
    with BoxReader(path) as io:
        ex = make_executor(io, "cpu", chunk_bytes=chunk)
        assert isinstance(ex, CpuExecutor) and not ex.overlapped
        jobs = [(lt, (0,) * len(lt.shape), tuple(lt.shape),
                 poisoned_like(lt.shape, torch.bfloat16 if lt.scale is not None else ref[k].dtype))
                for k, lt in sorted(logical.items())]
        ex.fill(jobs)
        buf = ex._staging
        # The largest chunk: whole rows of the fixture's large tensors, up to the 64 KiB bound.
        assert buf is not None and chunk // 2 < buf.numel() <= chunk
        allocations = ex.staging_allocations
        ex.fill(jobs)  # a second pass over every tensor: the same buffer, no allocation
        assert ex._staging is buf and ex.staging_allocations == allocations == 1
    for lt, _, _, got in jobs:
        assert_bit_equal(got, ref[lt.name].to(got.dtype), lt.name)
    assert ex.tensors == 2 * len(jobs) and ex.quantized == 2 * sum(lt.scale is not None for lt in logical.values())
    assert buf.numel() <= ex.peak_transient_bytes < chunk + (8 << 20)  # the buffer + the ~5 MiB LUT scratch
    assert ex.bytes_read >= 2 * sum(lt.stored.nbytes for lt in logical.values())


def test_factory_choices():
    with BoxReader(".") as io:
        assert isinstance(make_executor(io, "cpu"), CpuExecutor)
        forced = make_executor(io, "cpu", gpu_pipeline=True, readers=3, chunk_bytes=1 << 30)
        assert isinstance(forced, CudaExecutor) and forced.readers == 3 and forced.chunk_bytes == 32 << 20
        serial = make_executor(io, "cuda:0", gpu_pipeline=False)  # no CUDA call until a fill
        assert isinstance(serial, CudaExecutor) and (serial.readers, serial.depth, serial.host_depth) == (1, 1, 1)
        with pytest.raises(ValueError, match="gpu_pipeline"):
            make_executor(io, "cpu", gpu_pipeline="yes")


def test_counters_from_many_threads_lose_nothing():
    c = FillCounters()

    def work():
        for _ in range(20000):
            c.add("read_s", 1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.timings["read_s"] == 160000.0


@pytest.mark.parametrize("front", ["BoxFiller", "GpuPipeline"])
def test_deprecated_fronts_fill_the_same_bytes(checkpoints, front):
    path = checkpoints("llama", "fp8_block")
    ref = reference_state_dict(path)
    lt = next(lt for lt in get_adapter(path).plan.logical.values() if lt.scale is not None)
    got = poisoned_like(lt.shape, torch.bfloat16)
    with BoxReader(path) as io, pytest.deprecated_call():
        if front == "BoxFiller":
            from streaming_adapters.fill import BoxFiller

            f = BoxFiller(io, 1 << 16)
            f.fill(lt, (0, 0), tuple(lt.shape), got)
            assert (f.tensors, f.quantized) == (1, 1)
        else:
            from streaming_adapters.pipeline import GpuPipeline, split_box

            p = GpuPipeline(io, torch.device("cpu"), chunk_bytes=1 << 16, readers=2)
            p.run(split_box(lt, (0, 0), tuple(lt.shape), got, p.max_elems(1)))
            assert p.chunks >= 1 and p.read_s > 0
    assert_bit_equal(got, ref[lt.name].to(torch.bfloat16), lt.name)


@pytest.mark.parametrize("executor", ["BoxFiller", "pipeline"])
def test_host_memory_source_of_the_nemo_adapter(checkpoints, executor):
    """A byte source that is already host memory, as NeMo's ``integrations/nemo/parts.TemporaryBoxes`` (boxes
    its reader filled; ``backend = "mmap"``, no ``read_into``; the module needs NeMo installed, so its
    interface is rebuilt here): through the BoxFiller front NeMo uses, and through the pipeline's logic."""
    path = checkpoints("llama", "fp8_block")
    ref = reference_state_dict(path)
    lt = next(lt for lt in get_adapter(path).plan.logical.values() if lt.scale is not None)
    with BoxReader(path) as io:
        held = {lt.stored.name: io.read(lt.stored).clone(), lt.scale.tensor.name: io.read(lt.scale.tensor).clone()}

    class HostBoxes:
        backend, root, bytes_read = "mmap", Path(path), 0

        def read(self, info, start=None, length=None, *, out=None):
            t = held[info.name]
            for d, (a, n) in enumerate(zip(start or (), length or ())):
                t = t.narrow(d, a, n)
            return t

    src = HostBoxes()
    got = poisoned_like(lt.shape, torch.bfloat16)
    if executor == "BoxFiller":
        from streaming_adapters.fill import BoxFiller

        with pytest.deprecated_call():
            f = BoxFiller(src, 1 << 16)
        f.fill(lt, (0, 0), tuple(lt.shape), got)
        assert f.quantized == 1 and f.peak_transient_bytes < 8 << 20  # nothing staged again: host memory
    else:
        make_executor(src, "cpu", gpu_pipeline=True, chunk_bytes=1 << 16, readers=2).fill(
            [(lt, (0, 0), tuple(lt.shape), got)])
    assert_bit_equal(got, ref[lt.name].to(torch.bfloat16), lt.name)
