"""Ctrl-C for real: SIGINT to a torchrun group converting a checkpoint (as a terminal sends it: to the whole
foreground process group), SIGTERM to a plain process.  Every rank ends with one line that says how to
resume, exit code 130, no traceback of ours; a plain re-run of the same command resumes and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from streaming_adapters.testing.dist_pool import free_port

pytestmark = pytest.mark.dist

RESUME = "re-run the same command to resume from the last finished step (add output.restart=true only to start over)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """28 MB of block-FP8 Llama: ~50 steps of 0.25 MiB, a few seconds of conversion on 2 ranks."""
    from streaming_adapters.testing.fixtures import make_checkpoint

    path = tmp_path_factory.mktemp("sig") / "llama"
    make_checkpoint(path, "llama", "fp8_block", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8000)
    return path


def _args(ckpt, out, *extra):
    return ["-m", "streaming_adapters.run", "--config-name", "fp8_to_nvfp4", f"checkpoint.path={ckpt}",
            f"output.path={out}", "io.step_mb=0.25", "io.sync_s=0", "report.progress=false", *extra]


def _interrupt_when_started(cmd, out, sig, cwd) -> subprocess.CompletedProcess:
    """Start ``cmd`` in its own process group; once the conversion has finished a step (its resume point,
    ``<out>.partial/.streaming_adapters/steps/S.done``), send ``sig`` to the whole group (what Ctrl-C in a
    terminal does)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True)
    partial = out.with_name(out.name + ".partial")
    t0 = time.monotonic()
    done = partial / ".streaming_adapters" / "steps"
    while time.monotonic() - t0 < 240 and p.poll() is None and not any(done.glob("*.done")):
        time.sleep(0.02)
    assert p.poll() is None, "the conversion ended before it could be interrupted"
    os.killpg(p.pid, sig)
    t1 = time.monotonic()
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr), time.monotonic() - t1


def test_ctrl_c_stops_every_torchrun_rank_with_one_resume_line(ckpt, tmp_path):
    out = tmp_path / "nvfp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", *_args(ckpt, out, "parallel.dp_shard=2")]
    p, took = _interrupt_when_started(cmd, out, signal.SIGINT, tmp_path)
    text = p.stdout + p.stderr
    for rank in (0, 1):
        line = f"[rank {rank}] interrupted (SIGINT): {RESUME}"
        assert text.count(line) == 1, text[-3000:]
    # Our ranks print no traceback (torchrun's own agent still reports the signal it got, in its frames).
    assert "streaming_adapters/" not in text.replace("-m streaming_adapters.run", ""), text[-3000:]
    assert "KeyboardInterrupt" not in text, text[-3000:]
    assert p.returncode != 0 and took < 60
    assert not out.exists() and out.with_name("nvfp4.partial").exists()
    # A plain re-run of the same command (here as one process: any world size resumes) completes it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    q = subprocess.run([sys.executable, *_args(ckpt, out)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] > 0 and "resumed" in report["summary"], report["summary"]


def test_sigterm_to_a_plain_process_exits_130_with_one_line(ckpt, tmp_path):
    out = tmp_path / "nvfp4"
    p, took = _interrupt_when_started([sys.executable, *_args(ckpt, out)], out, signal.SIGTERM, tmp_path)
    assert p.returncode == 130, (p.returncode, p.stderr[-3000:])
    assert p.stderr.strip().splitlines()[-1] == f"interrupted (SIGTERM): {RESUME}", p.stderr[-3000:]
    assert p.stderr.count("interrupted") == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert took < 60
