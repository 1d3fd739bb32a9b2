"""The Triton NVFP4 decode kernel under Triton's CPU interpreter, bit for bit against the torch path of
``nvfp4.decode_box_into`` and against the producers' own decoders (compressed-tensors 0.20
``NVFP4PackedCompressor.decompress``, ModelOpt 0.47 ``NVFP4QTensor.dequantize``): every packed byte under every
non-NaN E4M3 scale byte, BF16 and FP32 outputs, -0.0 / +0.0 at code 8, global scales whose products go
subnormal or overflow, strided / 1-D / 3-D boxes, several tiles.

The kernel needs no interpreter patch: its only float op is one fp32 multiply (numpy's is IEEE), its BF16
rounding is integer arithmetic (the interpreter's own fp32 -> bf16 conversion truncates) and the sign is
xor-ed onto the product's bits (Triton's unary minus is ``0 - x``, which loses -0.0).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton) - the kernel needs it")

from helpers import assert_bit_equal  # noqa: E402
from streaming_adapters.numerics import nvfp4 as nv  # noqa: E402
from streaming_adapters.numerics.triton_nvfp4 import decode_triton  # noqa: E402

BIG_TILE = (64, 32, 4)  # the interpreter's cost is per op: big tiles run much faster than the GPU default
RULES = ("ct", "modelopt")
SCALE_BYTES = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # no NaN


def _torch(out_shape, packed, s8, g, rule, dtype=torch.bfloat16):
    out = torch.empty(out_shape, dtype=dtype)
    nv.decode_box_into(out, packed, s8, g, rule=rule, method="torch")
    return out


def _triton(out, packed, s8, g, rule, tile=BIG_TILE):
    ok = decode_triton(out, packed, nv.effective_scales(s8, g, rule), negative_zero=rule == "ct", interpret=True,
                       tile=tile)
    assert ok, "declined"
    return out


def _every_byte_under_every_scale():
    """Row r: the 256 packed bytes (32 blocks of 8 bytes = 512 columns) under scale byte SCALE_BYTES[r]."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(SCALE_BYTES), 1)
    s8 = SCALE_BYTES[:, None].expand(-1, 32).contiguous().view(torch.float8_e4m3fn)
    return packed, s8


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_byte_and_scale_byte(rule, dtype):
    packed, s8 = _every_byte_under_every_scale()
    g = torch.tensor([2688.0 / 0.37]) if rule == "ct" else torch.tensor(0.37 / 2688.0)
    want = _torch(packed.shape[:-1] + (512,), packed, s8, g, rule, dtype)
    got = _triton(torch.full_like(want, float("nan")), packed, s8, g, rule)
    assert_bit_equal(got, want, f"{rule} {dtype}")


def test_equals_the_producers_decoders():
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor

    from producers import SCHEME, load_modelopt_nvfp4

    packed, s8 = _every_byte_under_every_scale()
    gs = torch.tensor([1234.5])
    got = _triton(torch.empty(packed.shape[0], 512, dtype=torch.bfloat16), packed, s8, gs, "ct")
    want = NVFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": s8, "weight_global_scale": gs},
                                            SCHEME)["weight"]
    assert_bit_equal(got, want, "compressed-tensors")
    Q = load_modelopt_nvfp4()
    w2 = torch.tensor(3.7e-4)
    got = _triton(torch.empty(packed.shape[0], 512, dtype=torch.bfloat16), packed, s8, w2, "modelopt")
    qt = Q(torch.Size((packed.shape[0], 512)), torch.bfloat16, packed)
    assert_bit_equal(got, qt.dequantize(dtype=torch.bfloat16, scale=s8, double_scale=w2, block_sizes={-1: 16}),
                     "modelopt")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("g", [2.0**-120, 1e-30, 3.0e38, 2.0**100])
def test_products_that_go_subnormal_or_overflow(rule, g):
    """Extreme global scales: multipliers and products in the fp32 / BF16 subnormal range, or products past
    the BF16 / fp32 maximum (RNE to Inf on the bits, as the torch cast does)."""
    packed, s8 = _every_byte_under_every_scale()
    gt = torch.tensor([g]) if rule == "ct" else torch.tensor(g)
    eff = nv.effective_scales(s8, gt, rule)
    keep = torch.isfinite(eff).all(dim=1)  # the loader refuses non-finite multipliers; test the rest
    packed, s8 = packed[keep].contiguous(), s8[keep].contiguous()
    for dtype in (torch.bfloat16, torch.float32):
        want = _torch((packed.shape[0], 512), packed, s8, gt, rule, dtype)
        got = _triton(torch.empty_like(want), packed, s8, gt, rule)
        assert_bit_equal(got, want, f"{rule} g={g} {dtype}")


@pytest.mark.parametrize("rule", RULES)
def test_negative_zero_rule(rule):
    packed = torch.tensor([[0x08, 0x80, 0x88, 0x00] * 2])
    s8 = torch.tensor([[0x38]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
    got = _triton(torch.empty(1, 16), packed.to(torch.uint8), s8, torch.tensor([1.0]), rule)
    signs = torch.signbit(got[0, :8]).tolist()
    neg = rule == "ct"
    assert signs == [neg, False, False, neg, neg, neg, False, False] and bool((got == 0).all())


def _random(shape, seed):
    g = torch.Generator().manual_seed(seed)
    *lead, m = shape
    packed = torch.randint(0, 256, (*lead, m // 2), dtype=torch.uint8, generator=g)
    s = SCALE_BYTES[torch.randint(0, len(SCALE_BYTES), (*lead, m // 16), generator=g)]
    return packed, s.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("tile", [(4, 2, 1), (8, 32, 4), (16, 4, 2)])
def test_tiles_ragged(tile):
    packed, s8 = _random((37, 176), 1)  # 37 rows, 11 blocks: neither divides any tile
    g = torch.tensor([917.0])
    want = _torch((37, 176), packed, s8, g, "ct")
    assert_bit_equal(_triton(torch.empty(37, 176, dtype=torch.bfloat16), packed, s8, g, "ct", tile=tuple(tile)), want)


def test_strided_boxes_1d_and_3d():
    """A column range of a bigger destination and of the packed rows (what a DTensor column shard and a
    page-cache view give), 1-D rows, contiguous 3-D and a slice of stacked experts (no common row stride)."""
    g = torch.tensor(2.5e-3)
    packed, s8 = _random((40, 256), 2)
    big = torch.full((40, 512), float("nan"), dtype=torch.bfloat16)
    box_p, box_s = packed[:, 16:96], s8[:, 2:12]  # columns [32, 192) of 256
    _triton(big[:, 100:260], box_p, box_s, g, "modelopt")
    assert_bit_equal(big[:, 100:260], _torch((40, 160), box_p, box_s, g, "modelopt"))
    assert bool(big[:, :100].isnan().all()) and bool(big[:, 260:].isnan().all())  # nothing else written
    one_p, one_s = packed[3], s8[3]
    assert_bit_equal(_triton(torch.empty(256, dtype=torch.bfloat16), one_p, one_s, g, "modelopt"),
                     _torch((256,), one_p, one_s, g, "modelopt"))
    p3, s3 = _random((3, 20, 64), 3)
    assert_bit_equal(_triton(torch.empty(3, 20, 64, dtype=torch.bfloat16), p3, s3, g, "modelopt"),
                     _torch((3, 20, 64), p3, s3, g, "modelopt"))
    out3 = torch.full((3, 20, 256), float("nan"), dtype=torch.bfloat16)
    sl = out3[:, 2:18, 64:128]  # no single row stride over the leading dims
    _triton(sl, p3[:, 2:18], s3[:, 2:18], g, "modelopt")
    assert_bit_equal(sl, _torch((3, 16, 64), p3[:, 2:18], s3[:, 2:18], g, "modelopt"))


def test_declines_what_it_cannot_do():
    packed, s8 = _random((4, 32), 4)
    eff = nv.effective_scales(s8, torch.tensor([1.0]), "ct")
    assert not decode_triton(torch.empty(4, 32, dtype=torch.float16), packed, eff, negative_zero=True, interpret=True)
    assert not decode_triton(torch.empty(4, 64)[:, ::2], packed, eff, negative_zero=True, interpret=True)
    assert not decode_triton(torch.empty(4, 48), packed, eff, negative_zero=True, interpret=True)
    assert not decode_triton(torch.empty(4, 32), packed, eff, negative_zero=True)  # CPU, not interpreted
