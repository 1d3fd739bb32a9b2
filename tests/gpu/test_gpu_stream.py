"""GPU suite for the layer streaming of calibration and evaluation (run on the GPU machine; not collected
without CUDA): with the copies on their own streams (calibrate/forward.py) and the next layer's bytes
prefetched (read/prefetch.py), the streamed results still equal transformers' whole model on the same GPU
bit for bit: the input amax table of every Linear and the logits of every row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

import streaming_adapters as sa  # noqa: E402
from calib_fixtures import whole_model_amax  # noqa: E402
from streaming_adapters.calibrate.data import CalibrationTokens  # noqa: E402
from streaming_adapters.calibrate.engine import calibrate_activations  # noqa: E402
from streaming_adapters.calibrate.forward import forward_rows  # noqa: E402
from streaming_adapters.calibrate.skeleton import Skeleton  # noqa: E402
from streaming_adapters.calibrate.store import HiddenStore  # noqa: E402
from test_calibrate_engine import targets_of  # noqa: E402
from test_evaluate import whole_model_logits  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["0", "1"], ids=["copies-in-order", "copies-overlapped"])
def overlap(request, monkeypatch):
    # calibrate/forward.py: "0" = copies in order, "1" = overlapped (the default)
    monkeypatch.setenv("SA_OVERLAP_COPIES", request.param)
    return request.param


def ragged(n: int, seed: int) -> list[torch.Tensor]:
    # Many rows of different lengths: device buffers of the uploads are reused across sizes.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1001, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_calibration_on_cuda_equals_whole_model_on_cuda(checkpoints, family, overlap):
    path = checkpoints(family, "fp8_block")
    toks = CalibrationTokens(ragged(24, 0), "test", 64)
    got = calibrate_activations(path, toks, targets_of(path), device="cuda")
    want = whole_model_amax(path, toks, device="cuda")
    assert got.amax and all(got.amax[n] == want[n] for n in got.amax)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_evaluate_on_cuda_equals_whole_model_on_cuda(checkpoints, family, overlap, attn):
    path = checkpoints(family, "fp8_block")
    rows = ragged(16, 1)
    got = sa.evaluate(path, rows, device="cuda", keep_logits=True, attn_implementation=attn)
    want = whole_model_logits(path, rows, device="cuda", attn=attn)
    for j, w in enumerate(want):
        assert torch.equal(got["logits"][j], w), j


def test_overlapped_rows_equal_rows_in_order(checkpoints, monkeypatch):
    # Pinned store: uploads / downloads on side streams; unpinned: plain copies in order. Same bits.
    monkeypatch.setenv("SA_OVERLAP_COPIES", "1")
    path = checkpoints("llama", "fp8_block")
    sk = Skeleton(path, torch.device("cuda"))
    rows = ragged(40, 2)
    outs = []
    for pin in (True, False):
        store = HiddenStore([r.numel() for r in rows], sk.hidden_size, budget_bytes=1 << 30, work_dir=None, pin=pin)
        assert store.pinned is pin
        for k, r in enumerate(rows):
            store.write(k, sk.embed(r))
        store.advance()
        for i in range(sk.num_layers):
            forward_rows(sk.fill_layer(i), store, sk.layer_kwargs, torch.device("cuda"))
            store.advance()
            sk.free_layer(i)
        outs.append([store.read(k).clone() for k in range(len(rows))])
    sk.stop_prefetch()
    assert all(torch.equal(a, b) for a, b in zip(*outs))
