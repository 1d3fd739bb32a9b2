"""Triton BF16 -> NVFP4 quantization of a chunk of rows in one pass: the GPU path of
:func:`streaming_adapters.numerics.nvfp4.quantize_ct` / :func:`~streaming_adapters.numerics.nvfp4.quantize_modelopt`,
bit for bit (formats.md §2; nvfp4.py's docstring has the producers' sources).

Per 16-column block of a row, with ``amax = max |x|`` (exact: BF16 magnitudes)::

    compressed-tensors  s8  = e4m3_rne(min(fp32(bf16_rne(amax / 6)) * gs, 448)); 0 -> 0x20 (0.125)
                        eff = fp32(s8) / gs
    ModelOpt            s   = amax / fl(6 * w2); 0 -> 1.0;  s8 = e4m3_rne(clamp(s, 2**-9, 448))
                        eff = fl(fp32(s8) * w2)
    both                q   = fl(fp32(x) / eff)                 (IEEE; never Triton's ``/``, which is approximate)
                        code = (q < 0) << 3 | RNE_E2M1(|q|)   (ties .25 .75 1.25 1.75 2.5 3.5 5 to even; > 5 -> 6)

Per-block divisions are ``tl.math.div_rn``; every product is one fp32 rounding and none feeds an add except
SOFT's exact ``s * 2**9 + 2**23`` (so FMA contraction cannot change a result; the PTX has no ``.ftz``).  compressed-tensors' clamp of ``q`` to +-6 is
not applied: it cannot change a code (``|q| > 5`` gives 6 either way).  ``q < 0`` is both producers' sign
rule: a negative that rounds to magnitude 0 keeps code 8; an input of -0.0, or a quotient that underflows to
-0.0, gives code 0.  One guard the references do not need: a ModelOpt ``eff`` that underflows to 0 (group
amax below ~1e-38) becomes the smallest subnormal, so ``0 / eff`` stays 0 (the reference's code) while every
non-zero BF16 still quotients past 5.

The per-element division ``q = fl(x / eff)`` (the dominant cost: ``div.rn.f32`` is ~10 SASS instructions
with a slow-path call) has two exact forms, picked per launch by one uniform branch on the global scale:

* fast: ``y = div_rn(1, eff)`` once per block, then per element ``q0 = fma(x, y, 0)`` and one Markstein
  correction ``q = fma(fma(-eff, q0, x), y, q0)`` (3 FP ops).  That this is the IEEE quotient for every BF16
  ``x`` is checked exhaustively by ``benchmarks/nvfp4_division_check.py`` (all 2**30 significand pairs) and on
  the GPU's own FFMA by ``tests/gpu/test_triton_nvfp4.py``; it holds while no intermediate that matters goes
  subnormal, which a global scale in ``gs in [2**-7, 2**90]`` / ``w2 in [2**-90, 2**7]`` guarantees (every
  block's ``eff`` is then in ``[2**-99, 57344]``; that is any group amax in [2.2e-24, 3.4e5]);
* otherwise ``div_rn`` per element (``fast=False`` forces it everywhere).

``RNE_E2M1`` without comparisons: ``a = min(|q|, 6)``, ``e = max(floor(log2 a), 0)`` and ``M = 2**(e + 22)``,
whose ulp is the E2M1 step at ``a`` (0.5 below 2, 1 in [2, 4), 2 in [4, 6]); the float add ``fl(a + M)``
rounds ``a`` to the grid with ties to even, and ``code = bits(a + M) - bits(M) + 2e``.  Adding 8 to ``M``'s
bits (same binade, same parity) adds the sign bit to the code for free.  (Seven comparisons cost 37
instructions per element against 22 in the sm_90 SASS.)

Kernel shape.  The BF16 row is read as int32 words (two elements: even column = low half), so
``x_even = bits << 16`` and ``x_odd = bits & 0xFFFF0000`` are the exact fp32 values (no conversions, the
interpreter runs them exactly) and a word's packed byte is ``code(x_even) | code(x_odd) << 4``.  A program
takes ``BLOCK_G`` 16-column blocks x ``BLOCK_R`` rows, indexed ``[G, R, 8 words]`` (no loop; default 32 x 8,
4 warps, 32 elements per thread).  With blocks first, Triton's coalescing gives each lane one whole block
(2 x 16-byte loads, 32 contiguous bytes) and the warp 32 consecutive blocks of a row (1 KiB contiguous): the
block amax is an in-thread max, the block's scale math runs once in its thread, the packed bytes leave as one
8-byte store per block (256 contiguous bytes per warp), the scale bytes as 1-byte stores (1/32 of the
traffic), and the [G, R] scale tensor keeps the load layout (no shared memory, no barrier).  sm_90 SASS of
the default (``benchmarks/bench_nvfp4_sass.py``): 56 registers, no spills, no shared memory; per thread 4
LDG.E.EF.128, 2 STG.E.64 (packed), 2 STG.E.U8 (scales); ~22 instructions per element executed on the fast
path (28 with div_rn per element).

* per-tile offsets are int64 scalars, in-tile offsets int32 vectors (the wrapper checks the bound);
* ``w`` may be any view with unit inner stride whose base and row stride are 4-byte aligned (even element
  offset and stride: int32 words); the row stride in words arrives divided by UNIT=4 when it is a multiple
  of 4 so Triton can prove 16-byte alignment of every row (``tl.multiple_of`` on an argument is dropped in
  triton 3.6); a base that is not 16-byte aligned gets 4-byte loads (correct, slower).  Odd element offsets
  or strides are declined (the wrappers return None).

``SOFT=True`` does the three per-block conversions (fp32 -> BF16 RNE, fp32 -> E4M3 RNE, E4M3 -> fp32) with
integer bit operations instead of ``cvt``: Triton's interpreter (triton 3.6
``runtime/interpreter.py::_convert_float``) truncates fp32 -> bf16 and rounds fp32 -> fp8 half-up without
saturation, and GPUs before sm_89 have no E4M3 conversions.  The interpreter's ``fma`` rounds twice, so under
the interpreter the default is ``fast=False``; tests/test_triton_nvfp4_interpret.py patches in an exact fma
to run the fast path too.  tests/gpu runs every (soft, fast) combination bit for bit.

NaN inputs are not supported (the references are exact only on NaN-free weights; a NaN does not reach the
block max here and its own code is unspecified).

Memory: no scratch; outputs are allocated contiguous (``[..., K/2]`` uint8, ``[..., K/16]`` E4M3) or passed in.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ._triton import jit, native_fp8, tl, triton, triton_available, triton_importable  # noqa: F401

GROUP = 16
# Default tile: 32 blocks (512 columns) x 8 rows = 8 KiB read + 2 KiB + 256 B written per program, 4 warps,
# 32 elements per thread, 56 registers.  16 rows: ~5% fewer instructions per element but 98 registers.
# benchmarks/bench_nvfp4_kernels.py --sweep times the alternatives.
DEFAULT_TILE = (8, 32, 4)  # (BLOCK_R, BLOCK_G, num_warps)
_I32_MAX = 2**31 - 1


def _quant_nvfp4_kernel(
    packed_ptr, scale_ptr, w_ptr, gscale_ptr,
    rows, n_blocks, w_stride_u, n_col_tiles,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    PRODUCER: tl.constexpr, SOFT: tl.constexpr, FAST: tl.constexpr, UNIT: tl.constexpr,
):  # fmt: skip
    # w_ptr: int32 words of the BF16 rows (row stride w_stride_u * UNIT words); packed_ptr: uint8
    # [rows, n_blocks * 8]; scale_ptr: uint8 [rows, n_blocks]; gscale_ptr: fp32 [1] (gs or w2).
    w_stride = w_stride_u * UNIT
    pid = tl.program_id(0)
    tr = pid // n_col_tiles
    row_lo = tr * BLOCK_R
    g_lo = (pid - tr * n_col_tiles) * BLOCK_G
    ri = tl.arange(0, BLOCK_R)
    gi = tl.arange(0, BLOCK_G)
    ji = tl.arange(0, 8)
    # Tiles are indexed [G, R, 8] (blocks, rows, words), blocks first: Triton's coalescing then lays the
    # 32 lanes of a warp along consecutive blocks of one row (each lane one whole block: 32 bytes), and the
    # [G, R] scale bytes keep that layout (no shared-memory relayout before their store).
    mask2 = ((g_lo + gi) < n_blocks)[:, None] & ((row_lo + ri) < rows)[None, :]  # [G, R]
    mask3 = mask2[:, :, None]
    w_off = (gi * 8)[:, None, None] + ri[None, :, None] * w_stride + ji[None, None, :]
    w_tile = w_ptr + row_lo.to(tl.int64) * w_stride + g_lo * 8
    words = tl.load(w_tile + w_off, mask=mask3, other=0, eviction_policy="evict_first")

    # Exact fp32 values of the two BF16 halves.  0xFFFF0000 spelled as a signed int32.
    x_lo = (words << 16).to(tl.float32, bitcast=True)  # even column
    x_hi = (words & -65536).to(tl.float32, bitcast=True)  # odd column
    # [G, R] block max |x|, exact.  tl.reduce with the standard combine function, not tl.max: the
    # interpreter patches tl.reduce but cannot call tl.max (a jit function) outside TRITON_INTERPRET=1.
    amax = tl.reduce(tl.maximum(tl.abs(x_lo), tl.abs(x_hi)), 2, tl.standard._elementwise_max)

    g = tl.load(gscale_ptr)  # gs (compressed-tensors) or w2 (ModelOpt), fp32
    if PRODUCER == 0:
        t = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32))  # IEEE amax / 6
        if SOFT:  # fp32 -> bf16 round to nearest even on the bits (t >= 0, finite)
            tb = t.to(tl.int32, bitcast=True)
            tb = (tb + 0x7FFF + ((tb >> 16) & 1)) & -65536
            t = tb.to(tl.float32, bitcast=True)
        else:
            t = t.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        s = t * g  # exact: two 8-bit significands
        s = tl.where(s > 448.0, 448.0, s)  # clamp(max=448) (a NaN would pass, as in torch)
    else:
        s = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32) * g)  # amax / fl(6 * w2)
        s = tl.where(s == 0.0, 1.0, s)
        s = tl.where(s < 0.001953125, 0.001953125, s)  # clamp(min=2**-9, max=448)
        s = tl.where(s > 448.0, 448.0, s)

    # fp32 (0 <= s <= 448) -> E4M3 byte, round to nearest even.
    if SOFT:
        sb = s.to(tl.int32, bitcast=True)
        # normal (s >= 2**-6): round the fp32 bits to 3 mantissa bits; (e - 120) << 3 | m is the code
        c_norm = ((sb + 0x7FFFF + ((sb >> 20) & 1)) >> 20) - (120 << 3)
        # subnormal: s * 2**9 (exact) rounded to an integer by adding 2**23
        c_sub = (s * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
        s8 = tl.where(s < 0.015625, c_sub, c_norm)
        s8 = tl.where(s != s, 0x7F, s8)
    else:
        s8 = s.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    if PRODUCER == 0:
        s8 = tl.where(s8 == 0, 0x20, s8)  # all-zero / underflowed block: 0.125
    # E4M3 byte (0..126) -> fp32
    if SOFT:
        sf = tl.where(s8 < 8, s8.to(tl.float32) * 0.001953125,
                      ((s8 << 20) + (120 << 23)).to(tl.float32, bitcast=True))  # fmt: skip
    else:
        sf = s8.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if PRODUCER == 0:
        eff = tl.math.div_rn(sf, tl.full(sf.shape, 1.0, tl.float32) * g)
        fast_i = ((g >= 0.0078125) & (g <= 1.2379400392853803e27)).to(tl.int32)  # gs in [2**-7, 2**90]
    else:
        eff = sf * g
        fast_i = ((g >= 8.077935669463161e-28) & (g <= 128.0)).to(tl.int32)  # w2 in [2**-90, 2**7]
    s_tile = scale_ptr + row_lo.to(tl.int64) * n_blocks + g_lo
    tl.store(s_tile + gi[:, None] + ri[None, :] * n_blocks, s8.to(tl.uint8), mask=mask2)
    eff3 = eff[:, :, None]
    n_words = n_blocks * 8  # packed row length in bytes (K / 2)
    p_tile = packed_ptr + row_lo.to(tl.int64) * n_words + g_lo * 8
    p_off = (gi * 8)[:, None, None] + ri[None, :, None] * n_words + ji[None, None, :]

    # q = fl(x / eff) and neg8 = 8 where fl(x / eff) < 0 (the code's sign bit: -0.0 and NaN are not < 0),
    # two ways.  P = 1, the fast path (FAST and the global scale in range, which bounds every eff to
    # [2**-99, 57344]): y = fl(1 / eff) once per block (IEEE), then per element q0 = fl(x * y) and one
    # Markstein correction q = fma(fma(-eff, q0, x), y, q0), the IEEE quotient: benchmarks/
    # nvfp4_division_check.py checks it over every BF16 significand x every fp32 significand (2**30 pairs; in
    # this eff range no intermediate that matters is subnormal, so significands cover every exponent).
    # q0 = fma(x, y, +0.0) turns an input -0.0 into +0.0; otherwise q0 is 0 exactly where fl(x / eff) is
    # (|x / eff| >= 2**-149 for x != 0 here) and has its sign, also where it overflows (q is then NaN and
    # min(|q|, 6) below gives 6: code 7), so the sign bit is q0's.  P = 0: an IEEE div_rn per element.
    # The runtime branch is uniform (one scalar); each path carries its own rounding, packing and store so
    # that nothing is live across the branch (the union would need ~40% more registers).
    for P in tl.static_range(2 if FAST else 1):
        if FAST:
            if P == 1:
                run = fast_i == 1
            else:
                run = fast_i == 0
        else:
            run = True
        if run:
            if P == 1:
                y3 = tl.math.div_rn(tl.full(eff.shape, 1.0, tl.float32), eff)[:, :, None]
                q0_lo = tl.fma(x_lo, y3, 0.0)
                q0_hi = tl.fma(x_hi, y3, 0.0)
                q_lo = tl.fma(tl.fma(-eff3, q0_lo, x_lo), y3, q0_lo)
                q_hi = tl.fma(tl.fma(-eff3, q0_hi, x_hi), y3, q0_hi)
                neg8_lo = (q0_lo.to(tl.int32, bitcast=True) >> 28) & 8
                neg8_hi = (q0_hi.to(tl.int32, bitcast=True) >> 28) & 8
            else:
                e3 = eff3
                if PRODUCER == 1:  # an eff that underflowed to 0: 0 / eff must stay 0 (as the reference)
                    e3 = tl.where(e3 == 0.0, tl.full(e3.shape, 1, tl.int32).to(tl.float32, bitcast=True), e3)
                q_lo = tl.math.div_rn(x_lo, e3)
                q_hi = tl.math.div_rn(x_hi, e3)
                neg8_lo = tl.where(q_lo < 0.0, 8, 0)
                neg8_hi = tl.where(q_hi < 0.0, 8, 0)
            # E2M1 round half to even without comparisons.  a = min(|q|, 6) (a NaN q gives 6: PTX min.f32 /
            # FMNMX returns the number, IEEE minNum; the interpreter's numpy minimum would propagate it,
            # tests patch in np.fmin); e = max(exponent(a), 0); M = 2**(e + 22) has ulp = the E2M1 step at
            # a (0.5 below 2, 1 in [2, 4), 2 in [4, 6]), so fl(a + M) rounds a to the grid with ties to even
            # and bits(a + M) - bits(M) + 2e is the code.  The sign rides along: M + 8 ulps is in the same
            # binade with the same parity, so adding neg8 to M's bits adds 8 to the code.
            a_lo = tl.minimum(tl.abs(q_lo), 6.0)
            a_hi = tl.minimum(tl.abs(q_hi), 6.0)
            eb_lo = tl.maximum(a_lo.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23)
            eb_hi = tl.maximum(a_hi.to(tl.int32, bitcast=True) & 0x7F800000, 127 << 23)
            r_lo = (a_lo + (eb_lo + ((22 << 23) + neg8_lo)).to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
            r_hi = (a_hi + (eb_hi + ((22 << 23) + neg8_hi)).to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
            c_lo = r_lo - eb_lo + ((eb_lo >> 22) - (22 << 23) - 254)
            c_hi = r_hi - eb_hi + ((eb_hi >> 22) - (22 << 23) - 254)
            tl.store(p_tile + p_off, (c_lo | (c_hi << 4)).to(tl.uint8), mask=mask3)

# No integer specialisation (it would multiply compiled variants); UNIT carries the alignment that matters.
_NO_SPECIALIZE = ["rows", "n_blocks", "w_stride_u", "n_col_tiles"]


@functools.cache
def _kernel(interpret: bool):
    return jit(_quant_nvfp4_kernel, interpret, _NO_SPECIALIZE)




def pick_tile(n_blocks: int, rows: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps): the default tile with its block count narrowed to the row's (a power of
    two >= 2) and, for a few long rows, its row count narrowed to theirs, keeping the elements per program."""
    br, bg, nw = DEFAULT_TILE
    elems = br * bg
    g = max(2, min(bg, triton.next_power_of_2(max(1, n_blocks))))
    r = elems // g
    if rows is not None and rows < r:
        r = triton.next_power_of_2(max(1, rows))
        g = max(2, min(triton.next_power_of_2(max(1, n_blocks)), elems // r))
    return r, g, nw


def quantize_ct_triton(
    w: torch.Tensor, global_scale: torch.Tensor, *, out=None, interpret: bool = False, tile=None, soft=None, fast=None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`nvfp4.quantize_ct` on the GPU: (packed uint8 ``[..., K/2]``, block scale E4M3 ``[..., K/16]``),
    or None (nothing computed or written) when this path cannot take the inputs -- no CUDA / triton, ``w``
    not BF16 on a CUDA device, ``K % 16 != 0``, inner stride != 1, odd element offset / row stride, ``out``
    not two contiguous tensors of the right shapes and dtypes -- so the caller falls back to the reference
    (which raises on what no path accepts).

    ``global_scale``: fp32 ``[1]`` or 0-dim (:func:`nvfp4.ct_global_scale`), read on the device (no sync).
    ``out``: optional ``(packed uint8 [..., K/2], scale float8_e4m3fn or uint8 [..., K/16])``, contiguous,
    written in place and returned.

    Keyword-only, for tests and benchmarks: ``tile`` = (BLOCK_R, BLOCK_G, num_warps), powers of two;
    ``soft`` forces the integer per-block conversions (default: under the interpreter or before sm_89);
    ``fast`` (default: not under the interpreter, whose fma rounds twice) allows the reciprocal + Markstein
    division when the global scale is in range, else every element takes ``div_rn``; ``interpret`` runs
    Triton's CPU interpreter on CPU tensors.
    """
    return _quantize(w, global_scale, 0, out, interpret, tile, soft, fast)


def quantize_modelopt_triton(
    w: torch.Tensor, scale_2: torch.Tensor, *, out=None, interpret: bool = False, tile=None, soft=None, fast=None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`nvfp4.quantize_modelopt` on the GPU, same contract as :func:`quantize_ct_triton`
    (``scale_2`` = :func:`nvfp4.modelopt_scale_2` of the fused group's amax, fp32 0-dim or ``[1]``)."""
    return _quantize(w, scale_2, 1, out, interpret, tile, soft, fast)


def _quantize(w, g, producer, out, interpret, tile, soft, fast):
    if not triton_importable() or not (interpret or triton_available()):
        return None
    if not interpret and not w.is_cuda:
        return None
    if w.dtype != torch.bfloat16 or w.ndim < 1 or w.shape[-1] % GROUP != 0:
        return None
    if not isinstance(g, torch.Tensor) or g.numel() != 1 or not g.is_floating_point():
        return None
    k = w.shape[-1]
    if k > 1 and w.stride(-1) != 1:
        return None
    lead = w.shape[:-1]
    if out is None:
        packed = torch.empty(*lead, k // 2, dtype=torch.uint8, device=w.device)
        scale = torch.empty(*lead, k // GROUP, dtype=torch.uint8, device=w.device)
    else:
        packed, scale = out
        ok = (
            packed.dtype == torch.uint8 and scale.dtype in (torch.uint8, torch.float8_e4m3fn)
            and tuple(packed.shape) == (*lead, k // 2) and tuple(scale.shape) == (*lead, k // GROUP)
            and packed.is_contiguous() and scale.is_contiguous()
            and packed.device == w.device and scale.device == w.device
        )  # fmt: skip
        if not ok:
            return None
        scale = scale.view(torch.uint8)
    if w.numel() == 0:
        return packed, scale.view(torch.float8_e4m3fn)
    rows2d = _as_rows(w)
    if rows2d is not None:
        todo = [(rows2d, packed.view(-1, k // 2), scale.view(-1, k // GROUP))]
    else:  # leading dims that do not flatten into one row stride (e.g. a slice of stacked experts)
        todo = [(w[i], packed[i], scale[i]) for i in itertools.product(*(range(n) for n in lead[:-1]))]
    plans = [_plan_2d(wi, tile) for wi, _, _ in todo]
    if not all(plans):
        return None
    if soft is None:
        soft = interpret or not native_fp8(w.device.index if w.device.index is not None else 0)
    fast = (not interpret) if fast is None else bool(fast)
    gs = g.reshape(1).to(device=w.device, dtype=torch.float32)
    for (wi, pi, si), plan in zip(todo, plans):
        _launch_2d(wi, pi, si, gs, plan, producer, interpret, bool(soft), fast)
    return packed, scale.view(torch.float8_e4m3fn)


def _as_rows(w: torch.Tensor) -> torch.Tensor | None:
    if w.ndim == 1:
        return w[None]
    if w.ndim == 2:
        return w
    try:
        return w.view(-1, w.shape[-1])
    except RuntimeError:
        return None


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _plan_2d(w2: torch.Tensor, tile) -> tuple | None:
    """(tile, row stride in words) or None: the rows must be 4-byte aligned (even element offset and row
    stride: int32 words) and the in-tile offsets must fit int32."""
    stride = _row_stride(w2)
    if w2.shape[1] > 1 and w2.stride(1) != 1:
        return None
    if w2.data_ptr() % 4 or w2.storage_offset() % 2 or stride % 2:
        return None
    block_r, block_g, num_warps = tile or pick_tile(w2.shape[1] // GROUP, w2.shape[0])
    if block_r * max(stride // 2, w2.shape[1] // 2) + block_g * 8 > _I32_MAX:
        return None
    return (block_r, block_g, num_warps), stride // 2


def _launch_2d(w2, packed, scale, gs, plan, producer, interpret, soft, fast):
    (block_r, block_g, num_warps), stride_words = plan
    rows, k = w2.shape
    n_blocks = k // GROUP
    unit = 4 if stride_words % 4 == 0 else 1
    # int32 view of the words: same storage, element offset / 2, row stride / 2.
    words = torch.empty(0, dtype=torch.int32, device=w2.device).set_(
        w2.untyped_storage(), w2.storage_offset() // 2, (rows, k // 2), (stride_words, 1))
    n_col_tiles = triton.cdiv(n_blocks, block_g)
    grid = (triton.cdiv(rows, block_r) * n_col_tiles,)
    args = (packed, scale, words, gs, rows, n_blocks, stride_words // unit, n_col_tiles)
    meta = dict(BLOCK_R=block_r, BLOCK_G=block_g, PRODUCER=producer, SOFT=soft, FAST=fast, UNIT=unit)
    if interpret:
        _kernel(True)[grid](*args, **meta)
    else:
        with torch.cuda.device(w2.device):
            _kernel(False)[grid](*args, **meta, num_warps=num_warps)


# --------------------------------------------------------------------------------------------------
# Decode: packed NVFP4 -> BF16 / FP32 (the CUDA path of nvfp4.decode_box_into)
# --------------------------------------------------------------------------------------------------
#
#     out[r, c] = round(fp32(E2M1[code(r, c)]) * eff[r, c // 16])        eff = nvfp4.effective_scales(..)
#
# The E2M1 magnitude comes from the code bits by arithmetic (exact: mag * 0.5 below 2, mag - 2 in [2, 4],
# (mag - 4) * 2 above), the sign is xor-ed onto the product's bits; code 8 is -0.0 (compressed-tensors) or
# +0.0 (ModelOpt) by NEG_ZERO.  The one fp32
# product feeds no add, so FMA contraction cannot change it.  BF16 rounding is done on the bits (RNE:
# ``(b + 0x7FFF + (b >> 16 & 1)) >> 16``) because the interpreter truncates fp32 -> bf16; on the GPU it is
# 4 integer ops per element against a memory-bound loop.  A program takes BLOCK_R rows x BLOCK_G blocks
# (8 packed bytes -> 16 outputs each); row offsets are int64, in-row offsets int32 (m < 2**31).
DECODE_TILE = (8, 32, 4)  # (BLOCK_R, BLOCK_G, num_warps): 2 KiB of codes -> 8 KiB of BF16 per program


def _decode_nvfp4_kernel(
    out_ptr, packed_ptr, eff_ptr, rows, n_blocks, out_stride, packed_stride, eff_stride,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, NEG_ZERO: tl.constexpr, OUT_BF16: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    m2 = (r < rows)[:, None] & (g < n_blocks)[None, :]
    m3 = m2[:, :, None] & (j < 8)[None, None, :]
    r64 = r.to(tl.int64)
    col = g[None, :, None] * 8 + j[None, None, :]  # packed byte column
    byte = tl.load(packed_ptr + r64[:, None, None] * packed_stride + col, mask=m3, other=0).to(tl.int32)
    eff = tl.load(eff_ptr + r64[:, None] * eff_stride + g[None, :], mask=m2, other=0.0)[:, :, None]
    o = out_ptr + r64[:, None, None] * out_stride + col * 2
    for half in tl.static_range(2):  # low nibble -> even column, high nibble -> odd column
        code = (byte >> (4 * half)) & 15
        mag = code & 7
        magf = mag.to(tl.float32)
        v = tl.where(mag < 4, magf * 0.5, tl.where(mag < 6, magf - 2.0, (magf - 4.0) * 2.0))
        neg = (code & 8) != 0
        if not NEG_ZERO:
            neg = neg & (mag != 0)
        # The sign goes on the product's bits (fl(-a * b) == -fl(a * b)): Triton's unary minus is 0 - v,
        # which would turn -0.0 into +0.0.
        b = (v * eff).to(tl.int32, bitcast=True) ^ (neg.to(tl.int32) << 31)
        if OUT_BF16:
            tl.store(o + half, ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16), mask=m3)
        else:
            tl.store(o + half, b.to(tl.float32, bitcast=True), mask=m3)


@functools.cache
def _decode_kernel(interpret: bool):
    return jit(_decode_nvfp4_kernel, interpret, ["rows", "n_blocks", "out_stride", "packed_stride", "eff_stride"])


def decode_triton(out: torch.Tensor, packed: torch.Tensor, eff: torch.Tensor, *, negative_zero: bool,
                  interpret: bool = False, tile=None) -> bool:
    """Decode ``packed`` (uint8 ``[..., m/2]``) with fp32 block multipliers ``eff`` (``[..., m/16]``) into
    ``out`` (BF16 or FP32 ``[..., m]``, unit inner stride).  False when it cannot run here or cannot take
    these inputs (the caller then takes the torch path); ``interpret`` runs Triton's CPU interpreter."""
    if not triton_importable() or not (interpret or triton_available()):
        return False
    if (not interpret and not out.is_cuda) or out.dtype not in (torch.bfloat16, torch.float32):
        return False
    m = out.shape[-1]
    if m % GROUP or packed.dtype != torch.uint8 or tuple(packed.shape) != (*out.shape[:-1], m // 2):
        return False
    if out.numel() == 0:
        return True
    if out.stride(-1) != 1 or (m > 2 and packed.stride(-1) != 1) or m >= 2**31:
        return False
    eff = eff.to(device=out.device, dtype=torch.float32).contiguous()
    outs, packs = _as_rows(out), _as_rows(packed)
    if outs is not None and packs is not None:
        todo = [(outs, packs, eff.view(-1, m // GROUP))]
    else:  # leading dims that do not flatten into one row stride: one launch per 2-D slice
        lead = list(itertools.product(*(range(n) for n in out.shape[:-2])))
        todo = [(out[i], packed[i], eff[i]) for i in lead]
    block_r, block_g, num_warps = tile or DECODE_TILE
    for o2, p2, e2 in todo:
        rows, n_blocks = o2.shape[0], m // GROUP
        dst = o2.view(torch.int16) if o2.dtype == torch.bfloat16 else o2
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n_blocks, block_g))
        args = (dst, p2, e2, rows, n_blocks, _row_stride(o2), _row_stride(p2), e2.stride(0) if rows > 1 else n_blocks)
        meta = dict(BLOCK_R=block_r, BLOCK_G=block_g, NEG_ZERO=negative_zero, OUT_BF16=o2.dtype == torch.bfloat16)
        if interpret:
            _decode_kernel(True)[grid](*args, **meta)
        else:
            with torch.cuda.device(o2.device):
                _decode_kernel(False)[grid](*args, **meta, num_warps=num_warps)
    return True
