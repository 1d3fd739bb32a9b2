"""GPU suite for NVFP4 inputs (run on the GPU machine; not collected without CUDA): CUDA destinations
through the pipeline (reader threads -> pinned -> H2D -> the Triton decode kernel) equal the producers' own
decoders (compressed-tensors ``NVFP4PackedCompressor.decompress``, ModelOpt ``NVFP4QTensor.dequantize``,
run on CPU) bit for bit, for a checkpoint converted from the FP8 fixture and one of random codes and every
scale byte."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

import nvfp4_bodies as NB  # noqa: E402
import streaming_adapters as sa  # noqa: E402
from helpers import assert_bit_equal  # noqa: E402
from streaming_adapters.testing.fixtures import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-nvfp4")


@pytest.mark.parametrize("kind", ["converted", "random"])
@pytest.mark.parametrize("fmt", [NB.CT, NB.MO])
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_cuda_nvfp4_destinations_equal_the_producers(root, fmt, kind, backend):
    path = root / f"{fmt}-{kind}"
    if not path.exists():
        if kind == "random":
            NB.make_random_nvfp4(path, fmt, seed=3)
        else:
            src = root / "llama-fp8"
            if not src.exists():
                make_checkpoint(src, "llama", "fp8_block")
            NB.make_nvfp4(src, path, fmt)
    ref = NB.producer_state_dict(path)
    sd = {k: torch.full(v.shape, float("nan"), dtype=v.dtype if v.dtype == torch.float32 else torch.bfloat16,
                        device="cuda") for k, v in ref.items()}
    sa.load_fp8_state_dict(sd, path, io_backend=backend, chunk_bytes=1 << 16, readers=3)
    for k in ref:
        assert_bit_equal(sd[k].cpu(), ref[k].to(sd[k].dtype), k)
