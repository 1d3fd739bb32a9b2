"""The Triton NVFP4 quantization kernel under Triton's CPU interpreter, bit for bit against
``nvfp4.quantize_ct`` / ``nvfp4.quantize_modelopt`` (the CPU references): special weights, every finite BF16
pattern, every BF16 block amax, exact E2M1 ties, -0.0, tiny negatives, quotient overflow, extreme global
scales (both division paths and the range test between them), ragged shapes, strided / 1-D / 3-D inputs,
several tiles.

The interpreter cannot run the hardware conversions faithfully (fp32 -> bf16 truncates, fp32 -> fp8 rounds
half up), so every run uses the kernel's integer ``SOFT`` per-block conversions; tests/gpu runs the native
ones.  Two interpreter ops are made faithful to the GPU for these tests (``exact_gpu_ops``): ``tl.fma``
(numpy computes ``x * y + z`` with two roundings; the kernel's fast division needs the single-rounding FMA)
and ``tl.minimum`` (numpy's minimum propagates NaN; PTX ``min.f32`` returns the number, which the kernel
relies on for an overflowed quotient).  With those, the fast (reciprocal + Markstein) division path runs
here too (``fast=True``); the default under the interpreter is the per-element ``div_rn`` path.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton) - the kernel needs it")
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

from triton.runtime import interpreter as _interp  # noqa: E402

from streaming_adapters.numerics import nvfp4 as nv  # noqa: E402
from streaming_adapters.numerics.triton_nvfp4 import (  # noqa: E402
    pick_tile,
    quantize_ct_triton,
    quantize_modelopt_triton,
    triton_available,
)

BIG_TILE = (128, 64, 4)  # the interpreter's cost is per op: big tiles run ~10x faster than the GPU default
CT, MO = "ct", "modelopt"


# --------------------------------------------------------------------------------------------------
# A faithful fma / minnum for the interpreter
# --------------------------------------------------------------------------------------------------


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """IEEE fp32 fma (one rounding, subnormals, inf / NaN) on numpy float32 arrays: the product is exact in
    float64; the float64 sum's error term (TwoSum) decides the one case where rounding the float64 sum to
    float32 could round twice (the sum landing exactly on a float32 midpoint)."""
    a, b, c = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64), c.astype(np.float64))
    with np.errstate(all="ignore"):
        p = a * b
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        f = s.astype(np.float32)
        f64 = f.astype(np.float64)
        nb = np.nextafter(f, np.where(s > f64, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
        mid = np.isfinite(s) & np.isfinite(err) & (s != f64) & (2 * s == f64 + nb.astype(np.float64)) & (err != 0)
        go_nb = mid & (np.sign(err) == np.sign(nb.astype(np.float64) - f64))
        return np.where(go_nb, nb, f).astype(np.float32)


@pytest.fixture(autouse=True)
def exact_gpu_ops(monkeypatch):
    b = _interp.interpreter_builder
    monkeypatch.setattr(b, "create_fma", lambda x, y, z: _interp.TensorHandle(_fma32(x.data, y.data, z.data),
                                                                             z.dtype.scalar))  # fmt: skip
    monkeypatch.setattr(b, "create_minnumf", lambda x, y: b.binary_op(x, y, np.fmin))
    monkeypatch.setattr(b, "create_maxnumf", lambda x, y: b.binary_op(x, y, np.fmax))


def test_fma32_emulation_is_exact():
    """The emulated fma against exact rational arithmetic, on inputs built to hit float32 midpoints."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4000).astype(np.float32)
    b = rng.standard_normal(4000).astype(np.float32)
    c = (-(a.astype(np.float64) * b)).astype(np.float32)  # catastrophic cancellation
    c[::2] = rng.standard_normal(2000).astype(np.float32)
    c[1::4] = (a[1::4].astype(np.float64) * b[1::4] * 2.0**-25).astype(np.float32)  # near-midpoint sums
    got = _fma32(a, b, c)
    for i in range(len(a)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert got[i] == _rn32(exact), (a[i], b[i], c[i])


def _rn32(x: Fraction) -> np.float32:
    f = np.float32(float(x))  # float(Fraction) is correctly rounded to float64; fix double rounding below
    lo, hi = (f, np.nextafter(f, np.float32(np.inf))) if Fraction(float(f)) <= x else (
        np.nextafter(f, np.float32(-np.inf)), f)  # fmt: skip
    dlo, dhi = x - Fraction(float(lo)), Fraction(float(hi)) - x
    if dlo != dhi:
        return lo if dlo < dhi else hi
    return lo if (lo.view(np.uint32) & 1) == 0 else hi


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _ref(producer, w, g):
    return nv.quantize_ct(w, g) if producer == CT else nv.quantize_modelopt(w, g)


def _global(producer, w):
    amax = nv.tensor_amax(w)
    return nv.ct_global_scale(amax) if producer == CT else nv.modelopt_scale_2(amax)


def _run(producer, w, g, *, poison=(0xFF, 0x7F), **kw):
    """Quantize with the interpreted kernel into poisoned buffers (0x7F is the E4M3 NaN, which no NaN-free
    weight produces) and return (packed, scale bytes)."""
    lead, k = w.shape[:-1], w.shape[-1]
    packed = torch.full((*lead, k // 2), poison[0], dtype=torch.uint8)
    scale = torch.full((*lead, k // 16), poison[1], dtype=torch.uint8)
    fn = quantize_ct_triton if producer == CT else quantize_modelopt_triton
    kw.setdefault("tile", BIG_TILE)
    res = fn(w, g, interpret=True, out=(packed, scale.view(torch.float8_e4m3fn)), **kw)
    assert res is not None, "declined"
    assert res[0].data_ptr() == packed.data_ptr() and res[1].dtype == torch.float8_e4m3fn
    return packed, scale


def _check(producer, w, g=None, **kw):
    g = _global(producer, w) if g is None else g
    want_p, want_s = _ref(producer, w, g)
    got_p, got_s = _run(producer, w, g, **kw)
    _same(got_s, want_s.view(torch.uint8), "block scale")
    _same(got_p, want_p, "packed")


def _same(got, want, name):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(int(v) for v in bad[0])
        raise AssertionError(f"{name}: {bad.shape[0]} of {got.numel()} bytes differ, first at {i}: "
                             f"got {int(got[i]):#04x} want {int(want[i]):#04x}")  # fmt: skip


def _special(n, k, seed, scale=0.02):
    """Gaussian rows plus the edge cases: zero rows / blocks, values that underflow the E4M3 block scale,
    -0.0, tiny negatives (code 0x8), outliers, alternating signs."""
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


FAST = [pytest.param(False, id="div_rn"), pytest.param(True, id="fast")]

_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _codes_np(q: np.ndarray) -> np.ndarray:
    a = np.abs(q)
    return (a > 0.25).astype(int) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)


def near_boundary_blocks(producer: str, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(global scale, one BF16 block ``[1, 16]``) pairs where the block's effective scale puts an element
    within an ulp or two of an E2M1 rounding midpoint *and* the uncorrected quotient ``fl(x * fl(1 / eff))``
    gives a different code than ``fl(x / eff)``: only the Markstein correction of the fast path gets these
    right (random data almost never does this: the quotient must land within ~2**-23 of a midpoint).

    Built backwards: pick x (BF16), a midpoint c and a scale byte, set eff ~ x / c, derive the global scale
    that makes the producer compute that eff, keep the pairs where the two quotients' codes differ, then find
    a BF16 block amax that the producer maps to that scale byte (checked with the reference)."""
    rng = np.random.default_rng(seed)
    m = 40 * n
    cuts = np.array(nv._CUTS[2:], dtype=np.float64)  # 0.25 is a power of two: no quotient gets that close
    s8 = rng.integers(0x28, 0x58, m)
    sf = _E4M3[s8].astype(np.float32)
    x = (rng.integers(0x3F80, 0x4000, m).astype(np.uint32) << 16).view(np.float32)
    eff_t = x.astype(np.float64) / cuts[rng.integers(0, len(cuts), m)] * (1 + rng.uniform(-2, 2, m) * 2.0**-23)
    with np.errstate(all="ignore"):
        if producer == CT:
            g = (sf.astype(np.float64) / eff_t).astype(np.float32)
            eff = (sf / g).astype(np.float32)
        else:
            g = (eff_t / sf.astype(np.float64)).astype(np.float32)
            eff = (sf * g).astype(np.float32)
        q0 = (x.astype(np.float64) * (np.float32(1) / eff).astype(np.float64)).astype(np.float32)
        q = (x / eff).astype(np.float32)
    out = []
    for i in np.nonzero(_codes_np(q0) != _codes_np(q))[0]:
        gt = torch.tensor([g[i]]) if producer == CT else torch.tensor(g[i])
        base = torch.tensor(6 * float(eff[i]), dtype=torch.bfloat16).view(torch.int16).item()
        amax = torch.arange(base - 8, base + 9, dtype=torch.int16).view(torch.bfloat16)  # 17 candidates
        cand = torch.zeros(len(amax), 16, dtype=torch.bfloat16)
        cand[:, 0] = amax
        got = _ref(producer, cand, gt)[1].view(torch.uint8)[:, 0]
        ok = (got == int(s8[i])).nonzero()
        if len(ok) == 0:
            continue
        blk = torch.zeros(1, 16, dtype=torch.bfloat16)
        blk[0, :4] = torch.tensor([float(amax[int(ok[0])]), float(x[i]), -float(x[i]), float(x[i]) / 2])
        blk[0, 4:] = torch.from_numpy(rng.uniform(-1, 1, 12).astype(np.float32)) * float(x[i])
        out.append((gt, blk))
        if len(out) == n:
            break
    assert len(out) == n, f"only {len(out)} near-boundary blocks found"
    return out


# --------------------------------------------------------------------------------------------------
# Shapes and data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("producer", [CT, MO])
@pytest.mark.parametrize("shape", [(1, 16), (3, 32), (7, 48), (37, 2064), (130, 512), (6, 7168)])
def test_shapes_special_weights(shape, producer, fast):
    _check(producer, _special(*shape, seed=shape[0] * 7 + shape[1]), fast=fast)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("producer", [CT, MO])
def test_every_bf16_pattern(producer, fast):
    """Every finite BF16 value, laid out three ways: shuffled (a block's max is some large value, most codes
    small), sorted by magnitude (blocks of nearly equal values: upper codes), and strided through the sorted
    list (one value per binade range: all codes).  Global scale from the data (amax 3.39e38) and a typical
    one (amax 1.0, everything larger overflows the quotient or saturates)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    finite = (bits.int() & 0x7FFF) < 0x7F80
    vals = bits[finite].view(torch.bfloat16)  # 65280 values, +-0 included
    n = vals.numel() // 16 * 16
    order = vals.float().abs().argsort()
    perm = torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(1))
    strided = order[: n].view(16, -1).t().reshape(-1)
    w = torch.stack([vals[perm[:n]], vals[order[:n]], vals[strided]]).view(3, -1)
    _check(producer, w, fast=fast)
    if fast:  # (the div_rn path sees inconsistent global scales in test_global_scale_range_both_paths)
        one = torch.tensor(1.0, dtype=torch.bfloat16)
        _check(producer, w, nv.ct_global_scale(one) if producer == CT else nv.modelopt_scale_2(one), fast=fast)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("producer", [CT, MO])
def test_every_bf16_block_amax(producer, fast):
    """Block b has amax = BF16 magnitude b (0 .. 0x7F7F), the other 15 values spread below it: every
    block-scale computation (division, BF16 rounding, E4M3 rounding incl. subnormal scales and 0 -> 0.125)."""
    mags = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    frac = torch.rand(mags.numel(), 15, generator=torch.Generator().manual_seed(2)) * 2 - 1
    w = torch.cat([mags[:, None], mags[:, None] * frac], dim=1).to(torch.bfloat16).view(-1, 1024)
    _check(producer, w, fast=fast)  # amax 3.39e38: tiny blocks underflow to 0.125 / 2**-9
    for amax in (1.0, 2.0**-100):  # blocks above the amax saturate at 448 (an inconsistent but legal scale)
        a = torch.tensor(amax, dtype=torch.bfloat16)
        _check(producer, w, nv.ct_global_scale(a) if producer == CT else nv.modelopt_scale_2(a), fast=fast)


@pytest.mark.parametrize(
    "producer,g",
    [(CT, v) for v in (2.0**-100, 2.0**-7 * (1 - 2**-24), 2.0**-7, 1.0, 31616.0, 2.0**90, 2.0**90 * (1 + 2**-23),
                       2.0**120, 3.0e38)]
    + [(MO, v) for v in (2.0**-140, 2.0**-90 * (1 - 2**-24), 2.0**-90, 1e-5, 1.0, 2.0**7, 2.0**7 * (1 + 2**-23),
                         1e30)],
)  # fmt: skip
def test_global_scale_range_both_paths(producer, g):
    """Arbitrary global scales, at and just outside the fast path's range (the kernel switches to div_rn):
    heavy-tailed data, so quotients overflow, underflow, and land on every code."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 512, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 8)).to(torch.bfloat16)
    w[0, :16] = torch.tensor([2.0**-133, -(2.0**-133), 2.0**-126, -(2.0**-120)] * 4)  # BF16 subnormals
    w[1, :16] = torch.tensor([3.0e38, -3.0e38, 1.0, -1.0] * 4)
    w[2, :16] = torch.tensor([3.0e38, -(2.0**-133), 2.0**-133, -(2.0**-128)] * 4)  # quotients that underflow
    w[3, :16] = torch.tensor([3.0e6, -(2.0**-133), -1e-30, -(2.0**-128)] * 4)
    w[4, :16] = 0.0  # all-zero block: a huge (CT) or tiny (ModelOpt) global scale makes its eff subnormal
    w[5, :16] = torch.tensor([6 * 2.0**-129, 0.0, -0.0, 2.0**-133] * 4)  # eff subnormal for CT gs 2**120
    gt = torch.tensor([g], dtype=torch.float32)
    for fast in (False, True):
        _check(producer, w, gt if producer == CT else gt.reshape(()), fast=fast)


@pytest.mark.parametrize("producer", [CT, MO])
def test_near_boundary_quotients_need_the_correction(producer):
    """Elements whose quotient sits at an E2M1 rounding midpoint to within an ulp or two (see
    near_boundary_blocks): the fast path's Markstein correction must give the IEEE quotient's code."""
    for g, blk in near_boundary_blocks(producer, 24, seed=12):
        for fast in (False, True):
            _check(producer, blk, g, fast=fast, tile=(2, 2, 1))


@pytest.mark.parametrize("fast", FAST)
def test_ties_and_signs(fast):
    """Exact E2M1 ties: eff = 1/1024 for both producers, so t/1024 is exact in BF16 and in the quotient."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    block = [6.0] + ties + [-t for t in ties] + [-0.0]
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    w[0, 0] = 2.625  # tensor amax: CT gs = 2688 / 2.625 = 1024
    w[1, :16] = torch.tensor(block) / 1024
    w[1, 16:] = torch.linspace(-0.004, 0.004, 16)
    want_nibbles = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]
    for producer, g in ((CT, torch.tensor([1024.0])), (MO, torch.tensor(2.0**-10))):
        _check(producer, w, g, fast=fast)
        packed, scale = _run(producer, w, g, fast=fast)
        assert scale[1, 0].item() == 0x38  # E4M3 1.0: amax 6/1024 over 6 * 2**-10
        nib = torch.stack([packed[1, :8] & 15, packed[1, :8] >> 4], dim=1).reshape(-1).tolist()
        assert nib == want_nibbles
    assert _run(CT, w, torch.tensor([1024.0]), fast=fast)[1][0, 1].item() == 0x20  # all-zero block: 0.125
    assert _run(MO, w, torch.tensor(2.0**-10), fast=fast)[1][0, 1].item() == 0x38  # ModelOpt: 1.0


@pytest.mark.parametrize("producer", [CT, MO])
def test_random_scales_many_effective_scales(producer):
    """Many rows with different magnitudes: all E4M3 scale bytes, many effective scales."""
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(256, 256, generator=gen) * torch.exp(torch.randn(256, 1, generator=gen) * 3)).to(torch.bfloat16)
    for fast in (False, True):
        _check(producer, w, fast=fast)


def test_all_zero_tensor():
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    w[1, 3] = -0.0
    for producer in (CT, MO):
        _check(producer, w, fast=True)
    assert _run(CT, w, nv.ct_global_scale(nv.tensor_amax(w)))[1].eq(0x20).all()
    assert _run(MO, w, nv.modelopt_scale_2(nv.tensor_amax(w)))[1].eq(0x38).all()


# --------------------------------------------------------------------------------------------------
# Layouts, tiles, views
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [(1, 2, 1), (4, 4, 4), (2, 16, 2), (16, 8, 4), (8, 32, 4), (64, 64, 8)])
def test_tiles_ragged(tile):
    w = _special(45, 16 * 37, seed=5) if tile[0] * tile[1] >= 64 else _special(11, 16 * 9, seed=5)
    for producer in (CT, MO):
        _check(producer, w, tile=tile, fast=True)


@pytest.mark.parametrize(
    "pad,rows_step",
    [((16, 0), 1), ((0, 8), 1), ((2, 0), 1), ((6, 4), 1), ((0, 2), 1), ((32, 32), 2), ((2, 0), 3)],
)
def test_strided_views(pad, rows_step):
    """``w`` is a column narrow (and row slice) of a wider BF16 shard: 16-byte aligned rows, 4-byte aligned
    rows (UNIT=1, narrower loads), odd word strides."""
    k = 16 * 21
    base = _special(60, pad[0] + k + pad[1], seed=6)
    w = base[::rows_step, pad[0] : pad[0] + k]
    assert w.stride(1) == 1 and not w.is_contiguous()
    for producer in (CT, MO):
        g = _global(producer, w)
        want_p, want_s = _ref(producer, w.contiguous(), g)
        got_p, got_s = _run(producer, w, g, fast=True)
        _same(got_s, want_s.view(torch.uint8), "block scale")
        _same(got_p, want_p, "packed")


def test_1d_and_3d_inputs():
    w1 = _special(1, 96, seed=7)[0]
    for producer in (CT, MO):
        _check(producer, w1, fast=True)
    w3 = _special(40, 64, seed=8).view(4, 10, 64)
    for producer in (CT, MO):
        _check(producer, w3, fast=True)  # collapsible: one launch
        _check(producer, w3[:, :7], fast=True)  # rows of each expert sliced: one launch per expert
        _check(producer, w3[1:3, 2:9, 16:48], fast=True)


def test_unwritten_bytes_show():
    """Two different poisons give the same bytes: every output byte was written."""
    w = _special(37, 16 * 19, seed=9)
    for producer in (CT, MO):
        a = _run(producer, w, _global(producer, w), poison=(0x00, 0x00), tile=(8, 8, 4))
        b = _run(producer, w, _global(producer, w), poison=(0xFF, 0xFF), tile=(8, 8, 4))
        _same(a[0], b[0], "packed")
        _same(a[1], b[1], "block scale")


def test_default_call_and_dtypes():
    w = _special(9, 64, seed=10)
    gs = _global(CT, w)
    p, s = quantize_ct_triton(w, gs, interpret=True)
    assert p.dtype == torch.uint8 and p.shape == (9, 32) and s.dtype == torch.float8_e4m3fn and s.shape == (9, 4)
    want = nv.quantize_ct(w, gs)
    assert torch.equal(p, want[0]) and torch.equal(s.view(torch.uint8), want[1].view(torch.uint8))
    w2 = _global(MO, w)
    p, s = quantize_modelopt_triton(w, w2.reshape(1), interpret=True)  # a [1] scale_2 works too
    want = nv.quantize_modelopt(w, w2)
    assert torch.equal(p, want[0]) and torch.equal(s.view(torch.uint8), want[1].view(torch.uint8))
    e = quantize_ct_triton(torch.empty(0, 32, dtype=torch.bfloat16), gs, interpret=True)
    assert e[0].shape == (0, 16) and e[1].shape == (0, 2)


def test_declines_what_it_cannot_do():
    w = _special(8, 64, seed=11)
    gs = _global(CT, w)
    packed = torch.full((8, 32), 0xAB, dtype=torch.uint8)
    scale = torch.full((8, 4), 0xAB, dtype=torch.uint8)
    # CPU tensors without the interpreter: the caller's torch path
    assert quantize_ct_triton(w, gs) is None
    odd_offset = torch.zeros(8, 66, dtype=torch.bfloat16)[:, 1:65]
    odd_stride = torch.zeros(8 * 65, dtype=torch.bfloat16).as_strided((8, 64), (65, 1))
    for bad_w in (w.float(), w.half(), w[:, :40], w.t().contiguous().t(), odd_offset, odd_stride):
        assert quantize_ct_triton(bad_w, gs, interpret=True, out=None) is None, bad_w.shape
    assert quantize_ct_triton(w, torch.ones(2), interpret=True) is None
    assert quantize_ct_triton(w, gs, interpret=True, out=(packed[:, :31], scale)) is None
    assert quantize_ct_triton(w, gs, interpret=True, out=(packed, scale.float())) is None
    assert quantize_ct_triton(w, gs, interpret=True, out=(packed.t(), scale)) is None
    assert (packed == 0xAB).all() and (scale == 0xAB).all()
    if not torch.cuda.is_available():
        assert not triton_available()


def test_pick_tile():
    assert pick_tile(448) == (8, 32, 4)  # K = 7168
    assert pick_tile(1) == (128, 2, 4)  # K = 16: narrow tiles, more rows
    assert pick_tile(5) == (32, 8, 4)
    assert pick_tile(448, rows=1) == (1, 256, 4)  # one long row: all lanes along it
    assert pick_tile(448, rows=3) == (4, 64, 4)
    assert pick_tile(1, rows=3) == (4, 2, 4)
