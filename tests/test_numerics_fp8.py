"""The dequantization numerics on random boxes of every layout, against a per-element reference written
independently here (expand the grid with global indices, multiply in fp32, round)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from helpers import assert_bit_equal
from streaming_adapters.checkpoint.byteio import runs_of_box
from streaming_adapters.numerics.fp8 import block_window, decode_scales, dequantize_into
from streaming_adapters.read import iter_subboxes


def _reference(codes_full, scale_full, block, start, length, dtype):
    rows = torch.arange(start[0], start[0] + length[0]) // block[0]
    cols = torch.arange(start[1], start[1] + length[1]) // block[1]
    s = scale_full[rows][:, cols]
    box = codes_full[start[0]:start[0] + length[0], start[1]:start[1] + length[1]]
    return (box.to(torch.float32) * s).to(dtype)


LAYOUTS = {
    "block128": lambda n, k: (128, 128),
    "block_7x5": lambda n, k: (7, 5),
    "tensor": lambda n, k: (n, k),
    "channel": lambda n, k: (1, k),
    "group32": lambda n, k: (1, 32),
    "group128": lambda n, k: (1, 128),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", ["auto", "lut", "multiply"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_random_boxes(layout, method, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{layout}{method}{dtype}".encode()))  # not hash(): salted
    n, k = 576, 600
    block = LAYOUTS[layout](n, k)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    grid = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    scale = torch.rand(grid, generator=g) * 1e-2 + 1e-4
    for _ in range(6):
        r0, c0 = int(torch.randint(0, n - 1, (1,), generator=g)), int(torch.randint(0, k - 1, (1,), generator=g))
        ln = (int(torch.randint(1, n - r0 + 1, (1,), generator=g)), int(torch.randint(1, k - c0 + 1, (1,), generator=g)))
        lo, hi = block_window((r0, c0), ln, block)
        win = scale[lo[0]:hi[0], lo[1]:hi[1]].contiguous()
        # Destination: a strided view into a larger buffer, as a narrowed DTensor shard is.
        big = torch.full((ln[0] + 3, ln[1] + 7), float("nan"), dtype=dtype)
        out = big[1:1 + ln[0], 2:2 + ln[1]]
        box = codes[r0:r0 + ln[0], c0:c0 + ln[1]]  # strided view of the codes too
        dequantize_into(out, box, win, (r0, c0), block, lo, method=method)
        want = _reference(codes, scale, block, (r0, c0), ln, dtype)
        assert_bit_equal(out, want, f"{layout} box {(r0, c0)}+{ln}")
        assert torch.isnan(big[0]).all() and torch.isnan(big[:, 0]).all(), "wrote outside the box"


def test_special_codes_nan_and_negative_zero():
    codes = torch.tensor([[0x7F, 0xFF, 0x80, 0x00, 0x01, 0x7E]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = torch.empty(1, 6, dtype=torch.bfloat16)
    dequantize_into(out, codes, torch.tensor([[2.0]]), (0, 0), (1, 6), (0, 0), method="lut")
    assert torch.isnan(out[0, :2]).all()
    assert out[0, 2].item() == 0 and torch.signbit(out[0, 2])
    assert out[0, 4].item() == 2.0 * 2**-9 and out[0, 5].item() == 896.0


def test_stacked_experts_3d_with_per_expert_scales():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 0x7E, (5, 40, 24), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    scale = torch.rand(5, 1, 1, generator=g)
    out = torch.empty(3, 40, 24, dtype=torch.bfloat16)
    dequantize_into(out, codes[1:4], scale[1:4], (1, 0, 0), (1, 40, 24), (1, 0, 0))
    want = (codes[1:4].float() * scale[1:4]).to(torch.bfloat16)
    assert_bit_equal(out, want, "experts")


def test_ue8m0_encodings_agree():
    e = torch.tensor([100, 127, 130, 254], dtype=torch.uint8)
    want = torch.tensor([2.0**-27, 1.0, 8.0, 2.0**127])
    assert torch.equal(decode_scales(e, "u8_exponent"), want)
    assert torch.equal(decode_scales(e.view(torch.float8_e8m0fnu), "e8m0"), want)
    assert torch.equal(decode_scales(want, "float"), want)
    assert torch.isnan(decode_scales(torch.tensor([255], dtype=torch.uint8), "u8_exponent")).all()


def test_block_window_is_global():
    # DeepSeek-V3 kv_a_proj_with_mqa, TP=2: rows 288..575 touch block rows 2..4 of the 5-row grid.
    assert block_window((288, 0), (288, 7168), (128, 128)) == ((2, 0), (5, 56))
    assert block_window((0, 0), (576, 7168), (128, 128)) == ((0, 0), (5, 56))


def test_runs_of_box():
    assert runs_of_box((10, 8), (2, 0), (3, 8), 1) == (24, 24, [16])  # whole rows: one run
    run, _, offs = runs_of_box((10, 8), (2, 4), (3, 4), 2)
    assert run == 8 and offs == [2 * 16 + 8, 3 * 16 + 8, 4 * 16 + 8]
    run, _, offs = runs_of_box((2, 3, 4), (0, 1, 0), (2, 2, 4), 1)
    assert run == 8 and offs == [4, 16]


def test_iter_subboxes_covers_exactly_once():
    seen = torch.zeros(37, 23, dtype=torch.int32)
    for (r, c), (n, k) in iter_subboxes((5, 3), (37 - 5, 23 - 3), 50):
        assert n * k <= 50
        seen[r:r + n, c:c + k] += 1
    assert (seen[5:, 3:] == 1).all() and seen[:5].sum() == 0 and seen[:, :3].sum() == 0
