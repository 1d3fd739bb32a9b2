"""Kill one rank of a real 2-process torchrun conversion with SIGKILL mid-way; the output must not look
complete, and a re-run must resume from the finished steps and end byte-identical to an uninterrupted run."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from streaming_adapters.convert import convert_checkpoint

pytestmark = pytest.mark.dist

STEP_MB = 0.05  # ~70 steps on the tiny Llama fixture, so the kill lands mid-way


def _torchrun(src: Path, dst: Path, task: str, fmt: str | None, nproc: int) -> subprocess.Popen:
    from streaming_adapters.testing.dist_pool import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1",
           "-m", "streaming_adapters.run", "--config-name", task, f"checkpoint.path={src}", f"output.path={dst}",
           f"parallel.dp_shard={nproc}", f"io.step_mb={STEP_MB}", "io.sync_s=0", "report.progress=false"]
    if fmt:
        cmd.append(f"output.format={fmt}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _rank_pid(proc: subprocess.Popen, local_rank: int) -> int | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and "python" in child.name():
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _done_steps(dst: Path) -> int:
    d = dst.with_name(dst.name + ".partial") / ".streaming_adapters" / "steps"
    return len(list(d.glob("*.done"))) if d.exists() else 0


def _same_tree(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "report.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "report.json")
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), f"{n} differs"


@pytest.mark.parametrize("task,fmt", [("dequantize_bf16", None), ("fp8_to_nvfp4", "compressed-tensors"),
                                      ("fp8_to_nvfp4", "modelopt")])
def test_sigkill_one_rank_then_resume(checkpoints, tmp_path, task, fmt):
    src = checkpoints("llama", "fp8_block")
    target = "bf16" if task == "dequantize_bf16" else "nvfp4"
    want = tmp_path / "uninterrupted"
    convert_checkpoint(src, want, target=target, format=fmt, step_bytes=int(STEP_MB * (1 << 20)), progress=False)

    dst = tmp_path / "out"
    proc = _torchrun(src, dst, task, fmt, 2)
    killed = False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if _done_steps(dst) >= 5:
            pid = _rank_pid(proc, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=180)
    assert killed, f"the run ended before it could be killed:\n{out[-3000:]}"
    assert proc.returncode != 0
    assert not dst.exists(), "a killed run must not leave a folder that looks complete"
    done = _done_steps(dst)
    total = len(list((dst.with_name("out.partial")).glob("*.safetensors")))
    assert 5 <= done and total == 3

    proc = _torchrun(src, dst, task, fmt, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed" in out, out[-2000:]
    assert not dst.with_name("out.partial").exists()
    _same_tree(dst, want)
