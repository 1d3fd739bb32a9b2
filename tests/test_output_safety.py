"""The conversion's output is owned, locked and crash-safe (convert/staging.py): a real SIGKILL of a real
process at every kill point of the commit sequence, two concurrent jobs, a second job while one holds the
lock, a source replaced mid-resume, overlapping and foreign folders, a full, read-only or blocked destination,
Ctrl-C and SIGTERM with the default 30 s sync."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.convert.staging import (
    BOOK, KILL_ENV, KILL_POINTS, OutputExistsError, OutputLockedError, OutputWriteError, ResumeRefusedError,
    UnsafeOutputError,
)

STEP = 200_000  # ~20 steps on the tiny Llama fixture: kill points inside the step loop are reached


def _child(fn, env: dict[str, str] | None = None, wait: bool = True):
    """Run ``fn()`` in a forked process (a real process: SIGKILL ends it with nothing run after).  Returns
    (how it ended, message): ``-SIG`` when killed, 0 on success, 1 with the exception's text otherwise."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            import torch

            torch.set_num_threads(1)  # forked after the parent used its thread pool
            os.environ.update(env or {})
            fn()
            msg = b"ok"
        except BaseException as e:  # noqa: BLE001
            code, msg = 1, f"{type(e).__name__}: {e}\n{traceback.format_exc()}".encode()
        os.write(w, msg[:60000])
        os._exit(code)
    os.close(w)
    if not wait:
        return pid, r
    return _reap(pid, r)


def _reap(pid: int, r: int, timeout: float = 120):
    out = b""
    deadline = time.time() + timeout
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    os.close(r)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, out.decode(errors="replace")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_leftovers(dst: Path) -> None:
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(dst.name + ".")], "staging/old left"
    assert not (dst / BOOK).exists()


@pytest.fixture(scope="module")
def src(checkpoints):
    return checkpoints("llama", "fp8_block")


@pytest.fixture(scope="module")
def want(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("want") / "out"
    convert_checkpoint(src, out, target="nvfp4", step_bytes=STEP, progress=False)
    return _tree(out)


def _convert(src, dst, **kw):
    kw = {"target": "nvfp4", "step_bytes": STEP, "progress": False, "sync_every_s": 0, **kw}
    return lambda: convert_checkpoint(src, dst, **kw)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_every_kill_point_resumes_byte_identically(src, want, tmp_path, point):
    """Over an existing output (overwrite=True), so that every point of the commit sequence is reached."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old-output.txt").write_text("replaced by the conversion")
    at = f"{point}@3" if point.startswith("step") else point
    code, msg = _child(_convert(src, dst, overwrite=True), {KILL_ENV: at})
    assert code == -signal.SIGKILL, f"not killed at {point}: {msg}"
    report = convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False, overwrite=True)
    assert _tree(dst) == want
    _no_leftovers(dst)
    if point.startswith("step"):
        assert report.steps_resumed >= 2  # the steps recorded before the kill were not redone


@pytest.mark.parametrize("point", ["finalize-copied", "renamed", "book-partly-removed"])
def test_kill_in_the_commit_then_rerun_without_overwrite(src, want, tmp_path, point):
    dst = tmp_path / "out"
    code, _ = _child(_convert(src, dst), {KILL_ENV: point})
    assert code == -signal.SIGKILL
    convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False)
    assert _tree(dst) == want
    _no_leftovers(dst)


def test_a_second_job_is_refused_naming_the_holder(src, want, tmp_path):
    dst = tmp_path / "out"
    # Job A stops itself (SIGSTOP) after its third step, holding the lock: a real process, alive.
    pid, r = _child(_convert(src, dst), {KILL_ENV: "step-done@3:STOP"}, wait=False)
    lock = tmp_path / "out.partial" / BOOK / "lock"
    deadline = time.time() + 60
    while time.time() < deadline and not _stopped(pid):
        time.sleep(0.02)
    assert _stopped(pid)
    with pytest.raises(OutputLockedError, match="another conversion is writing") as e:
        convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == pid and f'"pid": {pid}' in str(e.value) and holder["dst"] == str(dst)
    with pytest.raises(OutputLockedError):  # restart must not take it away either
        convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False, restart=True)
    os.kill(pid, signal.SIGCONT)
    code, msg = _reap(pid, r)
    assert code == 0, msg
    assert _tree(dst) == want


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_two_concurrent_jobs_one_succeeds_the_other_is_refused(src, want, tmp_path):
    dst = tmp_path / "out"
    jobs = [_child(_convert(src, dst), wait=False) for _ in range(2)]
    results = [_reap(pid, r) for pid, r in jobs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 1], results
    refused = next(m for c, m in results if c == 1)
    assert refused.startswith(("OutputLockedError", "OutputExistsError")), refused
    assert _tree(dst) == want
    _no_leftovers(dst)


def test_a_changed_source_is_detected_on_resume(src, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    dst = tmp_path / "out"
    assert _child(_convert(ck, dst), {KILL_ENV: "step-synced@3"})[0] == -signal.SIGKILL
    # Same layout, other bytes, same mtime: only the content sample can tell.
    shard = ck / "model-00003-of-00003.safetensors"
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(st.st_size - 8)
        f.write(bytes(8))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ResumeRefusedError, match="source checkpoint's files changed") as e:
        convert_checkpoint(ck, dst, target="nvfp4", step_bytes=STEP, progress=False)
    assert "output.restart=true" in str(e.value) and "restart=True" in str(e.value)
    # A new file (new inode) with the same header and the same tail: the inode tells.
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = shard.with_name("new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ResumeRefusedError, match="changed"):
        convert_checkpoint(ck, dst, target="nvfp4", step_bytes=STEP, progress=False)
    convert_checkpoint(ck, dst, target="nvfp4", step_bytes=STEP, progress=False, restart=True)
    fresh = tmp_path / "fresh"
    convert_checkpoint(ck, fresh, target="nvfp4", step_bytes=STEP, progress=False)
    assert _tree(dst) == _tree(fresh)


def test_overlapping_source_and_destination_are_refused(src, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    before = _tree(ck)
    for dst in (ck, ck / "sub" / "out", tmp_path):
        with pytest.raises(UnsafeOutputError, match="overlaps the source"):
            convert_checkpoint(ck, dst, target="bf16", progress=False, overwrite=True, restart=True)
    # A source named like the staging folder of dst: restart must never delete it.
    named = tmp_path / "x.partial"
    shutil.copytree(src, named)
    with pytest.raises(UnsafeOutputError, match="overlaps the source"):
        convert_checkpoint(named, tmp_path / "x", target="bf16", progress=False, restart=True)
    assert _tree(ck) == before and _tree(named) == before


def test_restart_never_deletes_a_foreign_staging_folder(src, tmp_path):
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UnsafeOutputError, match="not made by this conversion tool"):
        convert_checkpoint(src, tmp_path / "out", target="bf16", progress=False, restart=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    # Another destination's staging folder (moved here by hand) is foreign too.
    other = tmp_path / "b"
    assert _child(_convert(src, other, target="bf16"), {KILL_ENV: "prepared"})[0] == -signal.SIGKILL
    os.rename(tmp_path / "b.partial", tmp_path / "c.partial")
    with pytest.raises(UnsafeOutputError):
        convert_checkpoint(src, tmp_path / "c", target="bf16", progress=False, restart=True)
    assert (tmp_path / "c.partial" / BOOK / "owner.json").exists()


def test_file_in_the_way(src, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputWriteError, match="a file is where the output folder must be"):
        convert_checkpoint(src, tmp_path / "out", target="bf16", progress=False, overwrite=True)
    with pytest.raises(OutputWriteError, match="a file is in the way"):
        convert_checkpoint(src, tmp_path / "out" / "sub", target="bf16", progress=False)
    assert (tmp_path / "out").read_text() == "a file"


def _mount_tmpfs(path: Path, opts: str) -> None:
    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_enospc_on_a_small_tmpfs_then_resume(src, want, small_fs):
    total = sum(len(v) for v in want.values())
    _mount_tmpfs(small_fs, f"size={total // 2}")  # room for about half the output
    dst = small_fs / "out"
    with pytest.raises(OutputWriteError, match="free space") as e:
        convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False, sync_every_s=0)
    assert "No space left on device" in str(e.value)
    subprocess.run(["mount", "-o", f"remount,size={total * 3}", str(small_fs)], check=True)
    report = convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False)
    assert report.steps_resumed > 0 and _tree(dst) == want
    _no_leftovers(dst)


def test_read_only_destination(src, small_fs):
    _mount_tmpfs(small_fs, "ro,size=1m")
    with pytest.raises(OutputWriteError, match="Read-only file system") as e:
        convert_checkpoint(src, small_fs / "out", target="bf16", progress=False)
    assert "writable output path" in str(e.value)


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_interrupt_records_the_finished_steps_with_the_default_sync(src, want, tmp_path, sig):
    dst = tmp_path / "out"
    # Default sync_every_s=30: no sync point is reached before the signal after step 5.
    code, msg = _child(_convert(src, dst, sync_every_s=30.0), {KILL_ENV: f"step-done@5:{sig}"})
    assert code == 1 and msg.startswith("ConversionInterrupted"), msg
    assert "5 of" in msg and "run the same command again to resume" in msg
    assert "restart=True (Python API) / output.restart=true (recipe)" in msg
    assert json.loads((tmp_path / "out.partial" / BOOK / "steps" / "r0of1.json").read_text()) == [0, 1, 2, 3, 4]
    report = convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False)
    assert report.steps_resumed == 5 and _tree(dst) == want


def _one_big_weight(root: Path, rows: int, cols: int) -> Path:
    """A checkpoint of one FP8 linear weight [rows, cols] (random codes, no NaN codes) with 128x128 scales."""
    import struct

    import torch

    root.mkdir(parents=True)
    name = "model.layers.0.mlp.gate_proj.weight"
    srows, scols = -(-rows // 128), -(-cols // 128)
    header = {name: {"dtype": "F8_E4M3", "shape": [rows, cols], "data_offsets": [0, rows * cols]},
              name + "_scale_inv": {"dtype": "F32", "shape": [srows, scols],
                                    "data_offsets": [rows * cols, rows * cols + 4 * srows * scols]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (rows * cols,), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0
    scales = torch.rand(srows * scols, generator=g) * 1e-3 + 1e-4
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + codes.numpy().tobytes()
                                            + scales.numpy().tobytes())
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    return root


def test_memory_follows_the_step_not_the_tensor(tmp_path):
    """A weight larger than a step is quantized in row blocks (amax pass, then quantize pass): peak memory
    follows step_bytes, and the bytes are the same as holding the whole tensor."""
    from streaming_adapters.testing.rss import RssSampler

    src = _one_big_weight(tmp_path / "src", 4096, 4096)  # 32 MiB of BF16
    tiny = _one_big_weight(tmp_path / "tiny", 128, 256)  # warms up the code path, not the buffers
    # A fresh interpreter per measurement, not a fork of the test process: a fork inherits that process's
    # freed-but-resident heap (after a few hundred tests, hundreds of MiB), reuses it and shows no growth.
    script = (
        "import sys\n"
        "from streaming_adapters.convert import convert_checkpoint\n"
        "tiny, src, out, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])\n"
        "convert_checkpoint(tiny, out + '-warm', target='nvfp4', step_bytes=step, progress=False)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "convert_checkpoint(src, out, target='nvfp4', step_bytes=step, progress=False)\n"
    )
    peaks = {}
    for step in (64 << 20, 1 << 20):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tiny), str(src), str(tmp_path / f"out{step}"),
                                 str(step)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == "ready"
        with RssSampler([proc.pid], interval_s=0.001) as rss:
            time.sleep(0.02)
            t0 = time.monotonic()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(timeout=300) == 0
        peaks[step] = rss.peak(proc.pid, t0, time.monotonic()) - rss.at(proc.pid, t0)
        print(f"step {step >> 20} MiB: peak RssAnon growth {peaks[step] / 2**20:.1f} MiB")
    whole, blocked = peaks[64 << 20], peaks[1 << 20]
    assert whole > 32 << 20, peaks  # holding the tensor: its 32 MiB of BF16 and more
    assert blocked < whole / 2, peaks  # 1 MiB blocks + quantize temporaries + up to ~15 MiB of fixed scratch
    assert _tree(tmp_path / f"out{64 << 20}") == _tree(tmp_path / f"out{1 << 20}")


def test_a_private_folder_left_by_a_kill_is_swept(src, want, tmp_path):
    """A job killed inside the atomic creation leaves ``<dst>.partial.new-<host>-<pid>`` (owned, unlocked):
    the next run deletes it; one whose lock is held, or made for another destination, is left alone."""
    dst = tmp_path / "out"
    left = tmp_path / "out.partial.new-host-1"
    (left / BOOK).mkdir(parents=True)
    (left / BOOK / "owner.json").write_text(json.dumps({"tool": "streaming_adapters", "dst": str(dst)}))
    foreign = tmp_path / "out.partial.new-host-2"
    (foreign / BOOK).mkdir(parents=True)
    (foreign / BOOK / "owner.json").write_text(json.dumps({"tool": "streaming_adapters", "dst": "/elsewhere"}))
    convert_checkpoint(src, dst, target="nvfp4", step_bytes=STEP, progress=False)
    assert not left.exists() and foreign.exists() and _tree(dst) == want
