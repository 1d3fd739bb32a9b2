"""GPU suite for the Triton FP8 dequant kernel: bit for bit against ``fp8.dequantize_into`` run on the CPU,
native (hardware FP8 / BF16 conversions) and SOFT (integer) paths, real checkpoint shapes.

Run on a CUDA machine from the repository root:  ``python -m pytest tests/gpu/test_triton_kernels.py -q``
(skips everywhere else).  NaN outputs are compared as NaN positions, other values as bits.
"""

from __future__ import annotations

import pytest
import torch

from streaming_adapters.numerics.fp8 import block_window, dequantize_into
from streaming_adapters.numerics.triton_fp8 import dequantize_into_triton, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and triton")

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
POISON = -1234.5
DEV = "cuda"


def _assert_same(out, ref):
    out, ref = out.cpu(), ref.cpu()
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan), "NaN positions differ"
    a, b = out.view(_BITS[out.dtype])[~nan], ref.view(_BITS[ref.dtype])[~nan]
    n_bad = int((a != b).sum())
    assert n_bad == 0, f"{n_bad} of {a.numel()} elements differ"


def _inputs(shape, box_start, block, gen, scale_kind="random"):
    lo, hi = block_window(box_start, shape, block)
    wshape = tuple(h - l for l, h in zip(lo, hi))
    u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    u8.view(-1)[: min(256, u8.numel())] = torch.arange(256, dtype=torch.uint8)[: min(256, u8.numel())]
    if scale_kind == "random":
        scale = torch.exp(torch.randn(wshape, generator=gen) * 3)
    elif scale_kind == "bf16":  # exact products, many exact BF16 rounding ties
        scale = torch.exp(torch.randn(wshape, generator=gen) * 3).to(torch.bfloat16).float()
    else:  # overflow, subnormal products, 0 / inf / NaN scales
        vals = torch.tensor([1e38, 3e36, 1e-40, 2.0**-140, 0.0, float("inf"), float("nan"), -2.5, 1.0])
        scale = vals[torch.randint(0, len(vals), wshape, generator=gen)]
    return u8.view(torch.float8_e4m3fn), scale, lo


def _check(shape, box_start, block, *, dtype=torch.bfloat16, soft=None, pad=(0, 0), scale_kind="random", tile=None,
           seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    codes, scale, lo = _inputs(shape, box_start, block, gen, scale_kind)
    ref = torch.empty(shape, dtype=dtype)
    dequantize_into(ref, codes, scale, box_start, block, lo, method="multiply")
    shard = torch.full((*shape[:-1], pad[0] + shape[-1] + pad[1]), POISON, dtype=dtype, device=DEV)
    out = shard.narrow(-1, pad[0], shape[-1])
    ok = dequantize_into_triton(out, codes.to(DEV), scale.to(DEV), box_start, block, lo, soft=soft, tile=tile)
    assert ok
    torch.cuda.synchronize()
    _assert_same(out, ref)
    if pad != (0, 0):
        s = shard.cpu()
        assert (s[..., : pad[0]] == POISON).all() and (s[..., pad[0] + shape[-1] :] == POISON).all()
    return out


CASES = [
    ((7168, 7168), (0, 0), (128, 128)),  # DeepSeek-V3 expert-free matrix, whole tensor
    ((72, 7168), (72, 0), (128, 128)),  # kv_a_proj_with_mqa [576, 7168] TP=8 shard 1: starts mid-block
    ((576, 7168), (0, 0), (128, 128)),  # ... whole: 5-row grid, last block 64 rows
    ((2048, 896), (1024, 896), (128, 128)),  # a column shard of a [4096, 7168] matrix
    ((1000, 3000), (77, 333), (128, 128)),  # ragged everything
    ((4096, 4096), (0, 0), (1, 4096)),  # per-channel
    ((4096, 4096), (0, 0), (4096, 4096)),  # per-tensor
    ((1024, 4096), (512, 0), (1, 128)),  # group 128
    ((1024, 4096), (3, 40), (1, 32)),  # group 32, start inside a group
    ((333, 555), (11, 9), (7, 5)),  # tiny blocks: per-element gather
    ((1, 1), (5, 5), (128, 128)),
]


@pytest.mark.parametrize("soft", [False, True], ids=["native", "soft"])
@pytest.mark.parametrize("shape,start,block", CASES)
def test_bf16_matches_cpu_reference(shape, start, block, soft):
    _check(shape, start, block, soft=soft)


@pytest.mark.parametrize("soft", [False, True], ids=["native", "soft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape,start,block", [CASES[1], CASES[4], CASES[8], CASES[9]])
def test_fp16_fp32_match_cpu_reference(shape, start, block, dtype, soft):
    _check(shape, start, block, dtype=dtype, soft=soft)


@pytest.mark.parametrize("soft", [False, True], ids=["native", "soft"])
@pytest.mark.parametrize("scale_kind", ["bf16", "extreme"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_ties_overflow_subnormals(dtype, scale_kind, soft):
    _check((512, 1024), (5, 3), (2, 16), dtype=dtype, scale_kind=scale_kind, soft=soft)


@pytest.mark.parametrize("pad", [(0, 64), (128, 128), (3, 5), (8, 1)])
@pytest.mark.parametrize("block", [(128, 128), (1, 7168), (1, 32)])
def test_strided_output(pad, block):
    """Narrow views of a wider shard: aligned rows (vectorised path) and misaligned ones (scalar path)."""
    _check((300, 1024), (200, 128), block, pad=pad)


@pytest.mark.parametrize("tile", [(16, 128, 4), (32, 128, 4), (128, 128, 8), (64, 256, 4), (256, 32, 4), (8, 512, 4)])
def test_tiles(tile):
    _check((1000, 3000), (77, 333), (128, 128), tile=tile)
    _check((1000, 3000), (77, 333), (1, 32), tile=tile)


def test_matches_torch_multiply_path_on_gpu():
    """The torch path of dequantize_into on CUDA (the current GPU default) gives the same bits."""
    gen = torch.Generator().manual_seed(1)
    codes, scale, lo = _inputs((2048, 7168), (64, 0), (128, 128), gen)
    codes, scale = codes.to(DEV), scale.to(DEV)
    a = torch.empty(2048, 7168, dtype=torch.bfloat16, device=DEV)
    b = torch.empty_like(a)
    dequantize_into(a, codes, scale, (64, 0), (128, 128), lo, method="multiply")
    assert dequantize_into_triton(b, codes, scale, (64, 0), (128, 128), lo)
    _assert_same(b, a)


def test_int64_tile_offsets():
    """A narrow view whose element offsets pass 2**31 (tile bases are int64, in-tile offsets int32)."""
    rows, stride, cols = 4096, 1 << 20, 256  # 8 GiB BF16 shard; last row starts at 2**32 elements
    shard = torch.full((rows, stride), POISON, dtype=torch.bfloat16, device=DEV)
    out = shard.narrow(1, stride - cols, cols)
    gen = torch.Generator().manual_seed(2)
    codes, scale, lo = _inputs((rows, cols), (0, 0), (128, 128), gen)
    ref = torch.empty(rows, cols, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, (0, 0), (128, 128), lo, method="multiply")
    assert dequantize_into_triton(out, codes.to(DEV), scale.to(DEV), (0, 0), (128, 128), lo)
    _assert_same(out, ref)
    assert (shard[:, : stride - cols] == POISON).all()
    del shard


def test_stacked_experts_3d():
    gen = torch.Generator().manual_seed(3)
    shape, start, block = (4, 256, 384), (2, 64, 0), (1, 128, 128)
    codes, scale, lo = _inputs(shape, start, block, gen)
    ref = torch.empty(shape, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, start, block, lo, method="multiply")
    out = torch.full(shape, POISON, dtype=torch.bfloat16, device=DEV)
    assert dequantize_into_triton(out, codes.to(DEV), scale.to(DEV), start, block, lo)
    _assert_same(out, ref)


def test_declines_cpu_and_non_unit_inner_stride():
    codes = torch.zeros(8, 8, dtype=torch.float8_e4m3fn, device=DEV)
    scale = torch.ones(1, 1, device=DEV)
    out = torch.full((8, 8), POISON, dtype=torch.bfloat16, device=DEV)
    assert not dequantize_into_triton(out.cpu(), codes.cpu(), scale.cpu(), (0, 0), (128, 128), (0, 0))
    assert not dequantize_into_triton(out.t(), codes, scale, (0, 0), (128, 128), (0, 0))
    assert (out == POISON).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device():
    dev = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(4)
    codes, scale, lo = _inputs((256, 512), (0, 0), (128, 128), gen)
    ref = torch.empty(256, 512, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, (0, 0), (128, 128), lo, method="multiply")
    out = torch.empty(256, 512, dtype=torch.bfloat16, device=dev)
    assert dequantize_into_triton(out, codes.to(dev), scale.to(dev), (0, 0), (128, 128), lo)
    _assert_same(out, ref)
