"""W4A4 on 1, 2 and 4 gloo ranks (samples split, one all-reduce MAX per layer): byte-identical outputs;
the recipe under torchrun."""

from __future__ import annotations

import json

import pytest

import calib_bodies as B
from calib_fixtures import random_ids, write_jsonl
from launch import entry
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


def file_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))} | \
        {"config.json": (folder / "config.json").read_bytes()}


@pytest.fixture(scope="module")
def world1(checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("w1")
    data = write_jsonl(d / "ids.jsonl", [{"input_ids": r} for r in random_ids(7, 40, seed=11)])
    src = str(checkpoints("llama", "fp8_block"))
    amax = B.convert_w4a4(src, str(d / "out"), str(data), "compressed-tensors", 6, 32)
    return src, data, d / "out", amax


def test_world_4_is_byte_identical_to_world_1(world1, tmp_path):
    src, data, out1, amax1 = world1
    pool = ProcessGroupPool(4)
    try:
        amaxes = pool.run(B.convert_w4a4, src, str(tmp_path / "out"), str(data), "compressed-tensors", 6, 32)
    finally:
        pool.close()
    assert all(a == amax1 for a in amaxes)
    assert file_bytes(tmp_path / "out") == file_bytes(out1)


def test_recipe_under_torchrun_2_is_byte_identical_to_world_1(world1, tmp_path):
    src, data, out1, amax1 = world1
    p = entry(["--config-name", "fp8_to_nvfp4_w4a4", f"checkpoint.path={src}", f"output.path={tmp_path / 'out'}",
               f"calibration.data={data}", "calibration.samples=6", "calibration.seq_len=32",
               "parallel.dp_shard=2", "io.step_mb=0.25"], nproc=2)
    assert "calibrate layer 3/3" in p.stdout, p.stdout[-2000:]
    assert file_bytes(tmp_path / "out") == file_bytes(out1)
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert r["calibration"]["input_amax"] == amax1 and r["calibration"]["samples"] == 6
    assert len(r["calibration"]["layers"]) == 3 and r["calibration"]["tokens_sha256"]


def test_sigkill_while_writing_resumes_without_calibrating_again(world1, tmp_path):
    """A rank killed after calibration, mid-way through the written steps: the re-run takes the table from
    the .partial folder (no 'calibrate layer' line), resumes the steps, and ends byte-identical."""
    import os
    import signal
    import time

    from test_convert_resume import _done_steps, _rank_pid

    src, data, out1, _ = world1
    dst = tmp_path / "out"
    args = ["--config-name", "fp8_to_nvfp4_w4a4", f"checkpoint.path={src}", f"output.path={dst}",
            f"calibration.data={data}", "calibration.samples=6", "calibration.seq_len=32", "parallel.dp_shard=2",
            "io.step_mb=0.05", "io.sync_s=0"]
    proc = _torchrun(args)
    killed, deadline = False, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if _done_steps(dst) >= 3 and (pid := _rank_pid(proc, 1)) is not None:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    first, _ = proc.communicate(timeout=240)
    assert killed and proc.returncode != 0, first[-2000:]
    assert "calibrate layer 3/3" in first
    assert (tmp_path / "out.partial" / ".streaming_adapters" / "calibration.json").exists()
    proc = _torchrun(args)
    second, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, second[-3000:]
    assert "calibrate layer" not in second and "resumed" in second, second[-2000:]
    assert file_bytes(dst) == file_bytes(out1)


def _torchrun(args: list[str]):
    import os
    import subprocess
    import sys

    from streaming_adapters.testing.dist_pool import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", "-m", "streaming_adapters.run", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


INJECTED = "1 rank(s) failed; rank 1: OSError: [Errno 28] No space left on device (injected on rank 1)"


def test_one_rank_failing_mid_layer_fails_every_rank_and_the_group_goes_on(checkpoints):
    """Rank 1's forward of layer 1 fails (ENOSPC): both ranks raise one error naming rank 1 and its cause,
    right after that layer's rows, instead of rank 0 waiting in the layer's all-reduce until the process
    group's timeout; the same ranks then calibrate again, equal to one process."""
    src, lengths = str(checkpoints("llama", "fp8_block")), [20, 17, 23, 12]
    pool = ProcessGroupPool(2)
    try:
        failed = pool.run(B.calibrate_rows, src, lengths, 1 << 30, None, None, 1, 1)
        again = pool.run(B.calibrate_rows, src, lengths, 1 << 30, None, None)
    finally:
        pool.close()
    for r in failed:
        assert r[:2] == ("error", "DistributedCheckpointError") and INJECTED in r[2], r
    one = B.calibrate_rows(src, lengths, 1 << 30, None, None)
    assert again[0][:2] == again[1][:2] == one[:2] and one[0] == "ok" and len(one[1]) == 18


def test_ranks_that_spill_and_ranks_that_do_not_save_in_step(checkpoints, tmp_path):
    """Rank 0's 33 tokens pass the host budget (32 tokens' worth) and spill; rank 1's 31 do not.  With a save
    due after every layer, both ranks still meet in every collective (the save is asked of all ranks) and
    the amax equal one process's."""
    src = str(checkpoints("llama", "fp8_block"))
    hidden = json.loads((checkpoints("llama", "fp8_block") / "config.json").read_text())["hidden_size"]
    lengths, budget = [33, 31], 32 * hidden * 2
    pool = ProcessGroupPool(2)
    try:
        got = pool.run(B.calibrate_rows, src, lengths, budget, str(tmp_path / "work"), 0.0)
    finally:
        pool.close()
    one = B.calibrate_rows(src, lengths, 1 << 30, None, None)
    assert one[0] == "ok" and got == [("ok", one[1], True), ("ok", one[1], False)]
