"""Shared fixtures: fabricated checkpoints (built once per session) and the reference dequantizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import reference` from test modules and pool workers

import torch  # noqa: E402

from streaming_adapters.testing.fixtures import make_checkpoint  # noqa: E402

# tests/gpu/ needs a CUDA device: it runs on the GPU machine (docs/benchmarks.md records the runs), and is
# not collected on CPU machines rather than reported as skipped.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]


class CheckpointFactory:
    """Builds a fixture checkpoint once per (family, fmt, options) and returns its folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple, Path] = {}

    def __call__(self, family: str = "llama", fmt: str = "fp8_block", **kw) -> Path:
        key = (family, fmt, tuple(sorted(kw.items())))
        if key not in self.cache:
            name = "-".join([family, fmt] + [f"{k}={v}" for k, v in sorted(kw.items())]).replace("/", "_")
            self.cache[key] = make_checkpoint(self.root / name, family, fmt, **kw).path
        return self.cache[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("ckpt"))


def pytest_configure(config):
    # Each pool worker takes cpu_count // world threads; the parent should not fight them.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
