"""The Triton FP8 dequant kernel under Triton's CPU interpreter, bit for bit against
``fp8.dequantize_into`` (the CPU reference): every byte value, ragged shapes, box starts inside blocks,
every scale-index mode of the kernel, strided outputs, FP16/FP32 outputs.

The interpreter cannot run the hardware FP8 / BF16 conversions faithfully (NaN codes decode to 480, fp32 ->
bf16 truncates), so these tests run the kernel's integer ``SOFT`` conversions; tests/gpu runs both paths
on a GPU.  NaN outputs are compared as NaN positions (their payload bits differ between implementations).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton) - the kernel needs it")
# numpy warns when the interpreter overflows to inf / makes NaN: both are expected results here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

from streaming_adapters.numerics.fp8 import block_window, dequantize_into  # noqa: E402
from streaming_adapters.numerics.triton_fp8 import (  # noqa: E402
    dequantize_into_triton,
    pick_tile,
    triton_available,
)

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
POISON = -1234.5


def _codes(shape, gen, all_bytes=True):
    """Random FP8 codes; with ``all_bytes`` the first 256 elements are the 256 byte values (0x7F, 0xFF NaN;
    0x80 -0.0) so every case sees each of them."""
    u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if all_bytes:
        flat = u8.view(-1)
        n = min(256, flat.numel())
        flat[:n] = torch.randperm(256, generator=gen)[:n].to(torch.uint8)
    return u8.view(torch.float8_e4m3fn)


def _scales(shape, gen, kind="random"):
    if kind == "random":  # fp32 scales with full mantissas, magnitudes around 1e-3 .. 1e3
        return torch.exp(torch.randn(shape, generator=gen) * 3)
    if kind == "bf16":  # BF16-valued scales: exact fp32 products, many exact ties at the BF16 rounding
        return torch.exp(torch.randn(shape, generator=gen) * 3).to(torch.bfloat16).float()
    if kind == "extreme":  # overflow to inf, subnormal products, zero, inf, NaN scales
        vals = torch.tensor([1e38, 3e36, 1e-40, 2.0**-140, 0.0, float("inf"), float("nan"), -2.5, 1.0, 2.0**-126])
        return vals[torch.randint(0, len(vals), shape, generator=gen)]
    raise ValueError(kind)


def _assert_same(out, ref):
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan), "NaN positions differ"
    a, b = out.view(_BITS[out.dtype])[~nan], ref.view(_BITS[ref.dtype])[~nan]
    bad = (a != b).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} elements differ, e.g. {out[~nan][bad[:4, 0]]} vs {ref[~nan][bad[:4, 0]]}"


def _run_case(gen, box_start, shape, block, *, dtype=torch.bfloat16, tile=None, scale_kind="random", pad=(0, 0)):
    """Dequantize a box with both paths; ``pad`` = extra (left, right) columns of the destination shard, so
    ``out`` is a narrow view with row stride != cols.  Returns the window shape (for mode assertions)."""
    lo, hi = block_window(box_start, shape, block)
    scale = _scales(tuple(h - l for l, h in zip(lo, hi)), gen, scale_kind)
    codes = _codes(shape, gen)
    ref = torch.empty(shape, dtype=dtype)
    dequantize_into(ref, codes, scale, box_start, block, lo)
    if pad != (0, 0):
        shard = torch.full((*shape[:-1], pad[0] + shape[-1] + pad[1]), POISON, dtype=dtype)
        out = shard.narrow(-1, pad[0], shape[-1])
    else:
        shard = out = torch.full(shape, POISON, dtype=dtype)
    assert dequantize_into_triton(out, codes, scale, box_start, block, lo, tile=tile, interpret=True)
    _assert_same(out, ref)
    if pad != (0, 0):  # nothing outside the box was written
        assert (shard[..., : pad[0]] == POISON).all() and (shard[..., pad[0] + shape[-1] :] == POISON).all()
    return scale.shape


# (box_start, box shape, block): ragged sizes, starts inside blocks, every layout of formats.md §1.
CASES = [
    ((0, 0), (256, 256), (128, 128)),  # aligned, several tiles
    ((72, 0), (72, 300), (128, 128)),  # TP shard of DeepSeek's 576-row kv_a_proj: starts mid-block
    ((130, 250), (93, 161), (128, 128)),  # ragged both ways, inside blocks
    ((5, 7), (200, 300), (1, 500)),  # per-channel (1, K), window of one column
    ((0, 0), (67, 1000), (1, 1000)),  # per-channel, cols > one tile
    ((3, 40), (70, 200), (1, 32)),  # group 32, box start inside a group
    ((0, 0), (40, 257), (1, 128)),  # group 128, ragged
    ((11, 9), (53, 47), (7, 5)),  # tiny non-power-of-two blocks: the per-element gather path
    ((0, 0), (100, 130), (100, 130)),  # per-tensor (N, K): window [1, 1]
    ((20, 30), (50, 60), (100, 130)),  # per-tensor, box inside the tensor
    ((1, 1), (1, 1), (128, 128)),  # a single element
    ((0, 3), (3, 5), (2, 3)),  # tiny box, tiny blocks
]


@pytest.mark.parametrize("box_start,shape,block", CASES)
def test_matches_reference_bf16(box_start, shape, block):
    gen = torch.Generator().manual_seed(hash((box_start, shape, block)) % 2**31)
    _run_case(gen, box_start, shape, block)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("box_start,shape,block", [CASES[2], CASES[5], CASES[7]])
def test_matches_reference_fp16_fp32(dtype, box_start, shape, block):
    gen = torch.Generator().manual_seed(7)
    _run_case(gen, box_start, shape, block, dtype=dtype)


@pytest.mark.parametrize("scale_kind", ["bf16", "extreme"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_ties_overflow_subnormals(scale_kind, dtype):
    """BF16 scales make exact ties at the BF16 rounding point (RNE, not half-up); extreme scales overflow to
    inf, give subnormal products, multiply by 0 / inf / NaN."""
    gen = torch.Generator().manual_seed(11)
    _run_case(gen, (5, 3), (64, 256), (2, 16), dtype=dtype, scale_kind=scale_kind)


def test_every_code_with_every_scale_bit_pattern():
    """All 256 codes against 64 scales each (rows = per-channel scales): the full decode table."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.arange(256, dtype=torch.uint8).repeat(64, 1).view(torch.float8_e4m3fn)
    scale = torch.cat([_scales((32, 1), gen, "random"), _scales((32, 1), gen, "extreme")])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = torch.empty(64, 256, dtype=dtype)
        dequantize_into(ref, codes, scale, (0, 0), (1, 256), (0, 0))
        out = torch.full((64, 256), POISON, dtype=dtype)
        assert dequantize_into_triton(out, codes, scale, (0, 0), (1, 256), (0, 0), interpret=True)
        _assert_same(out, ref)
        # and the formula of formats.md §1.1 itself, independent of fp8.py
        _assert_same(out, (codes.to(torch.float32) * scale).to(dtype))
    pos = (scale[:, 0] > 0) & scale[:, 0].isfinite()
    assert out.view(torch.int32)[pos, 0x80].eq(torch.tensor(-0.0).view(torch.int32)).all()  # 0x80 -> -0.0
    assert out[:, 0x7F].isnan().all() and out[:, 0xFF].isnan().all()


# Each (tile, block) pair below forces one scale-index mode of the kernel (ROW_WIDE x COL_WIDE), with
# tiles small enough that the box has ragged tiles on both edges.
MODES = [
    ((16, 32, 4), (128, 128), True, True),  # 4 scalars per tile
    ((16, 32, 4), (128, 8), True, False),  # two column vectors
    ((16, 32, 4), (4, 128), False, True),  # two row vectors
    ((16, 32, 4), (4, 8), False, False),  # per-element gather
    ((8, 16, 4), (16, 16), True, True),  # blocks exactly one tile, starts inside
    ((16, 32, 4, 16), (128, 128), True, True),  # 16-byte code loads (CODES_VEC=16)
]


@pytest.mark.parametrize("tile,block,row_wide,col_wide", MODES)
def test_scale_index_modes(tile, block, row_wide, col_wide):
    gen = torch.Generator().manual_seed(5)
    shape, start = ((45, 96), (13, 16)) if len(tile) == 4 else ((45, 83), (13, 21))
    lo, hi = block_window(start, shape, block)
    gr, gc = hi[0] - lo[0], hi[1] - lo[1]
    assert (block[0] >= tile[0] or gr <= 2) == row_wide and (block[1] >= tile[1] or gc <= 2) == col_wide
    _run_case(gen, start, shape, block, tile=tile)


@pytest.mark.parametrize("pad", [(8, 24), (3, 5), (0, 1)])
@pytest.mark.parametrize("block", [(128, 128), (1, 32)])
def test_strided_output_view(pad, block):
    """``out`` is a narrow of a wider row-major shard: 16-byte aligned rows (8, 24) or not (3, 5)."""
    gen = torch.Generator().manual_seed(13)
    _run_case(gen, (40, 64), (70, 192), block, pad=pad)


def test_codes_with_row_stride():
    gen = torch.Generator().manual_seed(17)
    big = _codes((50, 300), gen)
    codes = big[:, 20:220]  # inner stride 1, row stride 300
    scale = _scales((1, 2), gen)
    ref = torch.empty(50, 200, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, (0, 20), (128, 128), (0, 0))
    out = torch.full((50, 200), POISON, dtype=torch.bfloat16)
    assert dequantize_into_triton(out, codes, scale, (0, 20), (128, 128), (0, 0), interpret=True)
    _assert_same(out, ref)


def test_1d_and_3d_boxes():
    gen = torch.Generator().manual_seed(19)
    # 1-D: a bias-like vector with 1-D blocks
    codes = _codes((300,), gen)
    scale = _scales((4,), gen)
    ref = torch.empty(300, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, (50,), (100,), (0,))
    out = torch.full((300,), POISON, dtype=torch.bfloat16)
    assert dequantize_into_triton(out, codes, scale, (50,), (100,), (0,), interpret=True)
    _assert_same(out, ref)
    # 3-D: stacked experts [E, N, K] with per-expert block scales, box starting at expert 1
    codes = _codes((3, 40, 70), gen)
    lo, hi = block_window((1, 10, 5), (3, 40, 70), (1, 32, 32))
    scale = _scales(tuple(h - l for l, h in zip(lo, hi)), gen)
    ref = torch.empty(3, 40, 70, dtype=torch.bfloat16)
    dequantize_into(ref, codes, scale, (1, 10, 5), (1, 32, 32), lo)
    out = torch.full((3, 40, 70), POISON, dtype=torch.bfloat16)
    assert dequantize_into_triton(out, codes, scale, (1, 10, 5), (1, 32, 32), lo, interpret=True)
    _assert_same(out, ref)


def test_declines_what_it_cannot_do():
    codes = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    scale = torch.ones(1, 1)
    out = torch.full((4, 8), POISON, dtype=torch.bfloat16)
    # CPU tensors without the interpreter: the caller's torch path
    assert not dequantize_into_triton(out, codes, scale, (0, 0), (128, 128), (0, 0))
    # non-unit inner stride
    wide = torch.full((8, 4), POISON, dtype=torch.bfloat16)
    assert not dequantize_into_triton(wide.t(), codes, scale, (0, 0), (128, 128), (0, 0), interpret=True)
    # unsupported dtypes
    assert not dequantize_into_triton(out.to(torch.float64), codes, scale, (0, 0), (128, 128), (0, 0), interpret=True)
    assert not dequantize_into_triton(out, codes, scale.double(), (0, 0), (128, 128), (0, 0), interpret=True)
    assert (out == POISON).all() and (wide == POISON).all()
    if not torch.cuda.is_available():
        assert not triton_available()


def test_errors_like_the_reference():
    codes = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differ"):
        dequantize_into_triton(out[:3], codes, torch.ones(1, 1), (0, 0), (128, 128), (0, 0), interpret=True)
    with pytest.raises(ValueError, match="does not cover"):  # box crosses into block row 1, window has 1 row
        dequantize_into_triton(out, codes, torch.ones(1, 1), (126, 0), (128, 128), (0, 0), interpret=True)


def test_pick_tile_keeps_one_dim_wide():
    assert pick_tile((128, 128), (56, 56), True) == (64, 128, 4)
    assert pick_tile((1, 32), (4096, 224), True) == (256, 32, 4)  # group 32: columns wide
    assert pick_tile((1, 7168), (4096, 1), True)[1] == 128  # per-channel
    assert pick_tile((128, 128), (56, 56), False) == (16, 128, 4)  # unaligned: fewer elements per thread
