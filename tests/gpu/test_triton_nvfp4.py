"""GPU suite for the Triton NVFP4 quantization kernel: bit for bit against ``nvfp4.quantize_ct`` /
``nvfp4.quantize_modelopt`` run on the CPU (and the torch path of the same functions on the GPU), with the
native conversions and the SOFT ones, the fast (reciprocal + Markstein) division and the per-element
``div_rn`` one, checkpoint shapes, strided / 3-D views, 2**31+ offsets, and the fast division itself on
the GPU's FFMA over every BF16 x fp32 significand pair.

Run on a CUDA machine from the repository root:  ``python -m pytest tests/gpu/test_triton_nvfp4.py -q``
(~1 min on an H200; skips everywhere else).
"""

from __future__ import annotations

import pytest
import torch

from streaming_adapters.numerics import nvfp4 as nv
from streaming_adapters.numerics.triton_nvfp4 import (
    quantize_ct_triton,
    quantize_modelopt_triton,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and triton")

if triton_available():  # the CPU-side case builders live with the interpreter tests
    from test_triton_nvfp4_interpret import near_boundary_blocks  # noqa: E402

DEV = "cuda"
CT, MO = "ct", "modelopt"
# (soft, fast): native conversions + fast division is the production path
PATHS = [(False, True), (False, False), (True, True), (True, False)]
PATH_IDS = ["native-fast", "native-div_rn", "soft-fast", "soft-div_rn"]


def _ref(producer, w, g):
    # use_triton=False: on a CUDA tensor the torch path, not the kernel under test.
    return nv.quantize_ct(w, g, use_triton=False) if producer == CT else nv.quantize_modelopt(w, g, use_triton=False)


def _global(producer, w):
    amax = nv.tensor_amax(w)
    return nv.ct_global_scale(amax) if producer == CT else nv.modelopt_scale_2(amax)


def _gpu(producer, w, g, **kw):
    fn = quantize_ct_triton if producer == CT else quantize_modelopt_triton
    lead, k = w.shape[:-1], w.shape[-1]
    packed = torch.full((*lead, k // 2), 0xFF, dtype=torch.uint8, device=DEV)
    scale = torch.full((*lead, k // 16), 0x7F, dtype=torch.uint8, device=DEV)  # 0x7F: E4M3 NaN, never produced
    res = fn(w, g.to(DEV), out=(packed, scale), **kw)
    assert res is not None, "declined"
    torch.cuda.synchronize()
    return packed.cpu(), scale.cpu()


def _same(got, want, name):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(int(v) for v in bad[0])
        raise AssertionError(f"{name}: {bad.shape[0]} of {got.numel()} bytes differ, first at {i}: "
                             f"got {int(got[i]):#04x} want {int(want[i]):#04x}")  # fmt: skip


def _check(producer, w_cpu, g=None, *, view=None, **kw):
    """CPU reference on ``w_cpu``; the kernel on ``view(w_cpu.to(DEV))`` (default: the same tensor)."""
    g = _global(producer, w_cpu) if g is None else g
    want_p, want_s = _ref(producer, w_cpu, g)
    w = w_cpu.to(DEV) if view is None else view
    got_p, got_s = _gpu(producer, w, g, **kw)
    _same(got_s, want_s.view(torch.uint8), "block scale")
    _same(got_p, want_p, "packed")


def _special(n, k, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(torch.bfloat16)
    if n >= 6:
        w[0] = 0
        w[1, :16] = 0
        w[2, 16 % k : 16 % k + 16] *= 1e-12
        w[3, :8] = -0.0
        w[3, 8:16] = -1e-30
        w[4, 5] = 3.0
        w[5, ::3] = -w[5, ::3]
    return w


SHAPES = [(1, 16), (3, 32), (7, 48), (37, 2064), (576, 7168), (1000, 3072), (2048, 7168), (7168, 2048), (33, 18432)]


@pytest.mark.parametrize("soft,fast", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("producer", [CT, MO])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_shapes_match_cpu_reference(shape, producer, soft, fast):
    _check(producer, _special(*shape, seed=shape[0] + shape[1]), soft=soft, fast=fast)


@pytest.mark.parametrize("soft,fast", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("producer", [CT, MO])
def test_every_bf16_pattern_and_block_amax(producer, soft, fast):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits[(bits.int() & 0x7FFF) < 0x7F80].view(torch.bfloat16)
    n = vals.numel() // 16 * 16
    order = vals.float().abs().argsort()
    perm = torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(1))
    w = torch.stack([vals[perm[:n]], vals[order[:n]], vals[order[:n].view(16, -1).t().reshape(-1)]])
    mags = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    frac = torch.rand(mags.numel(), 15, generator=torch.Generator().manual_seed(2)) * 2 - 1
    wa = torch.cat([mags[:, None], mags[:, None] * frac], dim=1).to(torch.bfloat16).view(-1, 1024)
    for data in (w, wa):
        _check(producer, data, soft=soft, fast=fast)
        for amax in (1.0, 2.0**-100, 448.0):
            a = torch.tensor(amax, dtype=torch.bfloat16)
            g = nv.ct_global_scale(a) if producer == CT else nv.modelopt_scale_2(a)
            _check(producer, data, g, soft=soft, fast=fast)


@pytest.mark.parametrize("producer", [CT, MO])
def test_near_boundary_quotients(producer):
    """Quotients within an ulp or two of an E2M1 midpoint where fl(x * fl(1/eff)) has a different code than
    fl(x / eff): the native fast path's Markstein correction on the real FFMA."""
    for g, blk in near_boundary_blocks(producer, 400, seed=21):
        for soft, fast in PATHS[:2]:
            _check(producer, blk, g, soft=soft, fast=fast)


@pytest.mark.parametrize(
    "producer,g",
    [(CT, v) for v in (2.0**-100, 2.0**-10, 2.0**-7 * (1 - 2**-24), 2.0**-7, 1.0, 31616.0, 2.0**90,
                       2.0**90 * (1 + 2**-23), 2.0**120, 3.0e38)]
    + [(MO, v) for v in (2.0**-140, 2.0**-100, 2.0**-90 * (1 - 2**-24), 2.0**-90, 1e-5, 1.0, 2.0**7,
                         2.0**7 * (1 + 2**-23), 1e30)],
)  # fmt: skip
def test_global_scale_range(producer, g):
    """Arbitrary global scales at and outside the fast path's range, heavy-tailed data, subnormal inputs,
    quotients that overflow / underflow, zero blocks."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(256, 512, generator=gen) * torch.exp(torch.randn(256, 1, generator=gen) * 8)).to(torch.bfloat16)
    w[0, :16] = torch.tensor([2.0**-133, -(2.0**-133), 2.0**-126, -(2.0**-120)] * 4)
    w[1, :16] = torch.tensor([3.0e38, -3.0e38, 1.0, -1.0] * 4)
    w[2, :16] = torch.tensor([3.0e38, -(2.0**-133), 2.0**-133, -(2.0**-128)] * 4)
    w[3, :16] = torch.tensor([3.0e6, -(2.0**-133), -1e-30, -(2.0**-128)] * 4)
    w[4, :16] = 0.0
    w[5, :16] = torch.tensor([6 * 2.0**-129, 0.0, -0.0, 2.0**-133] * 4)
    gt = torch.tensor([g], dtype=torch.float32)
    for soft, fast in PATHS:
        _check(producer, w, gt if producer == CT else gt.reshape(()), soft=soft, fast=fast)


@pytest.mark.parametrize("producer", [CT, MO])
def test_random_scales(producer):
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(1024, 1024, generator=gen) * torch.exp(torch.randn(1024, 1, generator=gen) * 3)).to(torch.bfloat16)
    for soft, fast in PATHS:
        _check(producer, w, soft=soft, fast=fast)


@pytest.mark.parametrize("tile", [(1, 2, 1), (4, 4, 4), (8, 32, 4), (16, 32, 4), (32, 32, 8), (8, 64, 4), (64, 64, 8)])
def test_tiles(tile):
    w = _special(333, 16 * 137, seed=5)
    for producer in (CT, MO):
        _check(producer, w, tile=tile)


@pytest.mark.parametrize(
    "pad,rows_step", [((16, 0), 1), ((0, 8), 1), ((2, 0), 1), ((6, 4), 1), ((32, 32), 2), ((2, 0), 3)]
)
def test_strided_views(pad, rows_step):
    k = 16 * 211
    base = _special(600, pad[0] + k + pad[1], seed=6)
    w_cpu = base[::rows_step, pad[0] : pad[0] + k]
    base_gpu = base.to(DEV)
    view = base_gpu[::rows_step, pad[0] : pad[0] + k]
    for producer in (CT, MO):
        _check(producer, w_cpu.contiguous(), view=view)


def test_3d_and_1d():
    w = _special(4 * 300, 512, seed=7).view(4, 300, 512)
    for producer in (CT, MO):
        _check(producer, w)
        _check(producer, w[:, 5:250].contiguous(), view=w.to(DEV)[:, 5:250])
        _check(producer, w[2, 7])


def test_matches_torch_path_on_gpu():
    """The torch path of nvfp4.py on CUDA (the GPU fallback) gives the same bytes."""
    w = _special(4096, 7168, seed=8).to(DEV)
    for producer in (CT, MO):
        g = _global(producer, w)
        want = _ref(producer, w, g)
        got = (quantize_ct_triton if producer == CT else quantize_modelopt_triton)(w, g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))


def test_int64_tile_offsets():
    """A narrow view whose element offsets pass 2**31 (tile bases are int64, in-tile offsets int32)."""
    rows, stride, cols = 4096, 1 << 20, 256  # 8 GiB BF16 shard; last row starts at 2**32 elements
    shard = torch.zeros((rows, stride), dtype=torch.bfloat16, device=DEV)
    w_cpu = _special(rows, cols, seed=9)
    shard[:, stride - cols :] = w_cpu.to(DEV)
    for producer in (CT, MO):
        _check(producer, w_cpu, view=shard[:, stride - cols :])
    del shard
    torch.cuda.empty_cache()


def test_declines_cpu_and_non_unit_inner_stride():
    w = _special(8, 64, seed=10)
    gs = _global(CT, w)
    assert quantize_ct_triton(w, gs) is None  # CPU tensor
    assert quantize_ct_triton(w.to(DEV).t().contiguous().t(), gs) is None
    assert quantize_ct_triton(w.to(DEV).float(), gs) is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device():
    w = _special(256, 512, seed=11)
    for producer in (CT, MO):
        g = _global(producer, w)
        want = _ref(producer, w, g)
        res = (quantize_ct_triton if producer == CT else quantize_modelopt_triton)(w.to("cuda:1"), g.to("cuda:1"))
        assert res[0].device == torch.device("cuda:1")
        assert torch.equal(res[0].cpu(), want[0])
        assert torch.equal(res[1].cpu().view(torch.uint8), want[1].view(torch.uint8))


# --------------------------------------------------------------------------------------------------
# The fast division itself, on the hardware, over every significand pair
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _division_check_kernel(bad_ptr, x_sig, e_lo, x_exp, e_exp, BLOCK: tl.constexpr):
        """x = (128 + x_sig) * 2**(x_exp - 7), eff = significand (e_lo + i) * 2**(e_exp - 23): count the elements
        where fma(fma(-eff, q0, x), y, q0), q0 = fma(x, y, 0), y = div_rn(1, eff) differs from div_rn(x, eff)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        eff = (((e_exp + 127) << 23) | (e_lo + i)).to(tl.float32, bitcast=True)
        x = (((x_exp + 127) << 23) | (x_sig << 16)).to(tl.float32, bitcast=True) + tl.zeros([BLOCK], tl.float32)
        y = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), eff)
        q0 = tl.fma(x, y, 0.0)
        q = tl.fma(tl.fma(-eff, q0, x), y, q0)
        ref = tl.math.div_rn(x, eff)
        tl.atomic_add(bad_ptr, tl.sum((q.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)).to(tl.int32)))


@pytest.mark.parametrize("x_exp,e_exp", [(0, 0), (-3, 0), (2, 0), (-99, -99), (-90, -99), (20, 15)])
def test_fast_division_is_ieee_on_this_gpu(x_exp, e_exp):
    """Every BF16 significand x every fp32 significand (2**30 pairs) at a few exponent offsets inside the fast
    path's range (quotients 2**-3 .. 2**3 and extreme binades): the real FFMA gives the IEEE quotient."""
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    block = 1024
    for xs in range(128):
        _division_check_kernel[((1 << 23) // block,)](bad, xs, 0, x_exp, e_exp, BLOCK=block)
    torch.cuda.synchronize()
    assert bad.item() == 0
