"""GPU suite for the load and conversion paths (run on the GPU machine; not collected without CUDA):
CUDA destinations through the pipeline (reader threads -> pinned -> H2D copy stream -> Triton) equal the
independent CPU reference bit for bit for every format, and a GPU conversion writes the same bytes as a
CPU one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

import streaming_adapters as sa  # noqa: E402
from helpers import assert_bit_equal  # noqa: E402
from reference import reference_state_dict  # noqa: E402
from streaming_adapters.testing.fixtures import FORMATS, make_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu")


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("family,fmt", [("llama", f) for f in FORMATS] + [("deepseek_v3", "fp8_block"),
                                                                        ("qwen3_moe", "ct_block")])
def test_cuda_destinations_bit_exact(root, family, fmt, backend):
    path = root / f"{family}-{fmt}"
    if not path.exists():
        make_checkpoint(path, family, fmt)
    ref = reference_state_dict(path)
    sd = {k: torch.full(v.shape, float("nan"), dtype=v.dtype if v.dtype == torch.float32 else torch.bfloat16,
                        device="cuda") for k, v in ref.items()}
    # Small chunks and several readers: many chunks in flight through the pipeline's rings.
    report = sa.load_fp8_state_dict(sd, path, io_backend=backend, chunk_bytes=1 << 16, readers=3)
    for k in ref:
        assert_bit_equal(sd[k].cpu(), ref[k].to(sd[k].dtype), k)
    assert report.peak_gpu_bytes is not None


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_gpu_conversion_writes_the_cpu_bytes(root, fmt):
    src = root / "dsv3-conv"
    if not src.exists():
        make_checkpoint(src, "deepseek_v3", "fp8_block")
    sa.convert_checkpoint(src, root / f"cpu-{fmt}", target="nvfp4", format=fmt, progress=False, overwrite=True)
    sa.convert_checkpoint(src, root / f"gpu-{fmt}", target="nvfp4", format=fmt, progress=False, overwrite=True,
                          device="cuda", chunk_bytes=1 << 16)
    for f in sorted(p.name for p in (root / f"cpu-{fmt}").iterdir()):
        assert (root / f"cpu-{fmt}" / f).read_bytes() == (root / f"gpu-{fmt}" / f).read_bytes(), f
