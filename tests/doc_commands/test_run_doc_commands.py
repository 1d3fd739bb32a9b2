"""The documented torchrun / launch/torchrun.sh commands and the full layout table, run as written (with
/ckpt/... placeholders replaced by fabricated checkpoints and scratch folders)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from doc_commands.commands import ROOT, all_commands, substitute
from launch import entry
from streaming_adapters.run import compose

pytestmark = pytest.mark.dist

RUNNABLE = [c for c in all_commands() if c.kind == "recipe" and c.launcher in ("torchrun", "launch")
            and compose(*c.recipe).device == "cpu"]


@pytest.mark.parametrize("c", RUNNABLE, ids=lambda c: f"{c.where}:{c.text[:40]}")
def test_documented_command_runs(c, checkpoints, tmp_path):
    argv = substitute(c.argv, checkpoints, tmp_path)
    if c.launcher == "torchrun":
        p = entry(argv, nproc=c.nproc, timeout=900, cwd=str(tmp_path))
    else:
        env = {**os.environ, **c.env, "OMP_NUM_THREADS": "1", "SA_PYTHON": sys.executable}
        p = subprocess.run(["bash", str(ROOT / c.files[0]), "--nproc", str(c.nproc), *(
            ["--cpu"] if c.env.get("SA_CPU") else []), *argv[1:]], capture_output=True, text=True, env=env,
            cwd=tmp_path, timeout=900)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "[streaming_adapters]" in p.stdout, p.stdout[-3000:]
    if "verify=true" in c.text:
        assert "verify: 0 mismatched" in p.stdout or ": OK" in p.stdout, p.stdout[-3000:]


def test_full_layout_table(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/layout_table.py", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    # The README's rows (Which layout fits my model).
    for row in ("tp=8 dp=1 ep=1 (8) | 28.6 GiB", "tp=8 dp=2 ep=1 (16) | 81.9 GiB", "tp=8 dp=1 ep=8 (64) | 23.6 GiB"):
        assert row in p.stdout, (row, p.stdout)
