"""Run the real entry point the way users do: a plain process or ``torchrun --nproc-per-node N``."""

from __future__ import annotations

import os
import subprocess
import sys

from streaming_adapters.testing.dist_pool import free_port


def entry(args: list[str], nproc: int = 1, timeout: float = 300, check: bool = True,
          cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs in a scratch folder (``cwd``), so a run's default report.json never lands in the repository."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--master-addr=127.0.0.1", "-m", "streaming_adapters.run", *args]
    else:
        cmd = [sys.executable, "-m", "streaming_adapters.run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or scratch)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
