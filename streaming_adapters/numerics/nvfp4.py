"""BF16 -> NVFP4 quantization of a chunk of rows, bit-identical to the two producers (formats.md §2).

Layout (both producers): ``packed uint8 [N, K/2]``, ``packed[n, j] = code(W[n, 2j]) | code(W[n, 2j+1]) << 4``
(even column in the low nibble); ``block_scale float8_e4m3fn [N, K/16]``, block ``b`` = columns
``16b .. 16b+15``; E2M1 code = ``sign << 3 | mag``, ``mag`` -> {0, .5, 1, 1.5, 2, 3, 4, 6}, round half to even.

Matched against (read from the wheels, then checked bit for bit in ``tests/test_nvfp4_numerics.py``):

* **compressed-tensors** (``nvfp4-pack-quantized``, NVFP4A16) as llm-compressor 0.14.0 writes it: global
  scale = ``Observer.get_global_scale`` (llmcompressor/observers/base.py) -> ``generate_gparam``
  (compressed_tensors/quantization/utils/helpers.py, 0.19.0 pinned by llm-compressor 0.14.0, unchanged in
  0.20.0): ``2688.0 / amax_bf16``, which torch runs as ``amax.reciprocal() * 2688.0`` (``Tensor.__rdiv__``),
  both steps rounded to BF16 -- *not* ``bf16(2688 / amax)``, which differs for 27% of BF16 amax values.
  Block scales = ``calculate_qparams`` (same file) on the BF16 block min/max of ``MemorylessMinMaxObserver``
  (``gs * bf16(amax_b / 6)`` in fp32, clamp 448, cast E4M3, 0 -> 0.125); the module keeps the scale in
  BF16 (``initialize_qparams``: scale dtype = weight dtype), so ``NVFP4PackedCompressor.compress`` ->
  ``quantize`` divides ``fp32(W) / (fp32(s8) / gs)`` (``forward_helpers._quantize`` on CPU, the Triton
  ``div_rn`` kernels on GPU: same IEEE divisions), clamps to +-6 and rounds with ``cast_to_fp4``
  (``quantization/utils/fp4_utils.py``); ``pack_fp4_to_uint8`` takes the sign from ``signbit`` of the
  rounded value.  Decode = ``NVFP4PackedCompressor.decompress``: ``bf16(fp32(LUT[q]) * fl(fp32(s8) / gs))``.
* **ModelOpt 0.47.0** unified HF export (``W4A16_NVFP4``): ``_export_quantized_weight``
  (modelopt/torch/export/unified_export_hf.py) -> ``NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer``
  (``amax.float() / 2688.0``), ``get_weights_scaling_factor`` (``amax_b / fl(6 * w2)``, 0 -> 1.0, clamp
  ``[2**-9, 448]``, E4M3), ``quantize`` (``fp32(W) / fl(fp32(s8) * w2)``, no clamp) and ``_cast_fp4``
  (``searchsorted`` on the bounds + ties at 0.75/1.75/3.5; sign = ``scaled < 0``), all in
  modelopt/torch/quantization/qtensor/nvfp4_tensor.py.  Decode = ``NVFP4QTensor.dequantize``:
  ``bf16(e2m1_values[q] * fl(fp32(s8) * w2))`` (its table has +0.0 at code 8).

Two device traps, handled here so CPU and CUDA give the same bytes:

* torch on CUDA turns ``tensor / python_float`` into ``tensor * fp32(1 / b)`` (``div_true_kernel_cuda``);
  on CPU it divides.  ModelOpt's ``amax / 2688.0`` therefore differs by one ulp between a GPU export and a
  CPU one for 21% of BF16 amax values: :func:`modelopt_scale_2` takes ``producer_device`` ("cuda" = what
  ``hf_ptq.py`` writes).  Every other division here is tensor / device tensor, IEEE on both.
* ModelOpt's all-zero group gives ``w2 = 0`` -> NaN block scales and ``0x77`` bytes; we use ``w2 = 1.0``
  (block scales 1.0, codes 0), which every loader decodes to exact zeros, also after compressed-tensors'
  ``ModelOptNvfp4Converter`` takes ``1 / w2``.

How the codes are computed (CPU and CUDA, one path): a code depends only on the element's BF16 bit
pattern and its block's E4M3 scale byte (the global scale is fixed per call), so for each scale byte
present we build a 65536-entry table ``code[bf16 bits]`` and the element pass is a gather,
``codes = table[row(s8) * 65536 + bits + 32768]``.  The tables are exact by construction: ``fl(x / eff)``
crosses an E2M1 rounding boundary ``b`` exactly when ``x > c * eff``, ``c`` the fp32 midpoint next to ``b``
(``x / eff`` never equals a midpoint: that would need ``x``'s 8-bit significand to be a multiple of the
midpoint's odd 25-bit one), and ``c * eff`` is exact in fp64 (<= 50 bits).  The sign threshold
``c = 2**-150`` is the producers' ``-0.0`` rule: a negative that rounds to zero keeps its sign (code 8)
unless ``x / eff`` itself underflows to ``-0.0``.  Block scales are a table over the 32768 BF16 block amaxes.

Throughput, [4096, 7168] BF16 on the 2-core CI machine (quiet): ``quantize_ct`` / ``quantize_modelopt``
0.52-0.55 G elements/s (53-56 ms: block amax 14, gather + pack 33, tables 1.4), ``dequantize_ct`` to BF16
0.63-0.65 G/s.  For scale: an in-memory copy of the same BF16 tensor runs at 1.9-7 G/s (noisy), and the
codes alone by divide + compare (the producers' formulation) at 0.28-0.33 G/s.

Memory: per call the block scale bytes and amax bits (5 B per 16 elements) and the code tables (64 KiB per
distinct scale byte: ~30 on real weights, at most 127); per row sub-chunk (``CPU_SUBCHUNK_ELEMS``) an int32
index (4 B/element), the uint8 codes and an int16 packing temporary.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

GROUP = 16  # NVFP4 block: 16 consecutive input columns share one E4M3 scale (both producers)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_MAX = E2M1_MAX * E4M3_MAX  # 2688: the block holding the tensor amax gets scale 448, its max code 6

# CPU sub-chunk: 256k elements keeps the int32 index (1 MiB) and the codes in L2.  Gather + pack loop on
# the 2-core CI machine: 2^15 -> 0.61, 2^17 -> 0.94, 2^18 -> 0.98, 2^19 -> 0.98 G el/s.
CPU_SUBCHUNK_ELEMS = 1 << 18
# GPU sub-chunk: large to amortise launches; the int32 index is 64 MiB.
GPU_SUBCHUNK_ELEMS = 1 << 24

# fp32 midpoints next to the E2M1 boundaries (formats.md §2): ``fl(q) > b`` for the boundaries that
# round down on a tie (0.25, 1.25, 2.5, 5: mid above b) and ``fl(q) >= b`` for those that round up
# (0.75, 1.75, 3.5: mid below b).  ulp(b) = 2**(floor(log2 b) - 23).  Index 0 is the sign threshold.
_CUTS = (
    2.0**-150,  # fl(q) != 0 (a negative q below this rounds to -0.0 and loses its sign bit)
    0.25 + 2.0**-26,
    0.75 - 2.0**-25,
    1.25 + 2.0**-24,
    1.75 - 2.0**-24,
    2.5 + 2.0**-23,
    3.5 - 2.0**-23,
    5.0 + 2.0**-22,
)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E4M3_EIGHTH = 0x20  # float8_e4m3fn 0.125 = 2**(4 - 7): exponent field 4, mantissa 0

assert sys.byteorder == "little", "the int16 nibble packing below assumes a little-endian host"


# --------------------------------------------------------------------------------------------------
# Global scales
# --------------------------------------------------------------------------------------------------


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    """``max |w|`` as a 0-dim tensor in ``w``'s dtype (llm-compressor's observers reduce in the weight
    dtype; the value is exact in fp32 too, so an all-reduce MAX may run in fp32 and cast back)."""
    if w.numel() == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    lo, hi = torch.aminmax(w)
    return torch.maximum(hi, lo.neg())


def ct_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``weight_global_scale``: fp32 ``[1]`` = ``2688 / amax`` rounded as
    ``generate_gparam`` does it in ``amax``'s dtype (BF16 for a BF16 model).

    ``amax`` is the fused group's :func:`tensor_amax` (formats.md §2.3); it is cast to BF16 (exact for the
    amax of BF16 weights, e.g. after an fp32 all-reduce), since the arithmetic differs in fp32.  All-zero
    (or < ~7.9e-36, where ``2688 / amax`` overflows BF16) and NaN give 1.0, as ``generate_gparam``'s
    ``nan_to_num`` does.
    """
    a = amax.reshape(1).to(torch.bfloat16).abs()  # generate_gparam: max(|min(-a, 0)|, |max(a, 0)|) == |a|
    a = torch.clamp(a, min=torch.finfo(a.dtype).tiny)
    # ``2688.0 / a`` in Python is ``a.reciprocal() * 2688.0`` (torch Tensor.__rdiv__): two roundings.
    gs = a.reciprocal() * GLOBAL_MAX
    gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.to(torch.float32)


def modelopt_scale_2(amax: torch.Tensor, *, producer_device: str = "cuda") -> torch.Tensor:
    """ModelOpt ``weight_scale_2``: fp32 0-dim ``amax / 2688`` (the dequantize multiplier).

    ``producer_device="cuda"`` reproduces an export run on a GPU, where torch computes
    ``amax * fp32(1 / 2688)``; ``"cpu"`` the IEEE quotient of a CPU export (they differ by one ulp for 21%
    of BF16 amax values).  ``amax == 0`` (all-zero fused group) gives 1.0 instead of ModelOpt's 0, which
    would make every block scale NaN: see the module docstring.
    """
    a = amax.reshape(()).to(torch.float32)
    if producer_device == "cuda":
        inv = torch.tensor(1.0 / GLOBAL_MAX, dtype=torch.float32, device=a.device)  # rounded from double
        w2 = a * inv
    elif producer_device == "cpu":
        w2 = a / torch.tensor(GLOBAL_MAX, dtype=torch.float32, device=a.device)
    else:
        raise ValueError(f"producer_device must be 'cuda' or 'cpu', got {producer_device!r}")
    return torch.where(a == 0, torch.ones_like(w2), w2)


# --------------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------------


def quantize_ct(w: torch.Tensor, global_scale: torch.Tensor, *, use_triton: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 rows ``[..., K]`` -> (``weight_packed`` uint8 ``[..., K/2]``, ``weight_scale`` E4M3 ``[..., K/16]``)
    exactly as llm-compressor 0.14 / compressed-tensors write ``nvfp4-pack-quantized``.

    ``global_scale`` is :func:`ct_global_scale` of the fused group's amax; rows are independent, so any
    row range of a tensor can be quantized alone with the group's scale.  ``use_triton=False`` keeps a CUDA
    tensor on the torch path (the reference the kernel is checked and timed against).
    """
    if w.is_cuda and use_triton:  # the fused Triton kernel (numerics/triton_nvfp4.py), same bytes; None: it cannot run
        from .triton_nvfp4 import quantize_ct_triton

        if (r := quantize_ct_triton(w, global_scale)) is not None:
            return r
    gs = global_scale.reshape(1).to(device=w.device, dtype=torch.float32)
    six = torch.tensor(E2M1_MAX, device=w.device)  # a device tensor: a Python 6.0 is a reciprocal on CUDA

    def scale_of_amax(amax_b: torch.Tensor) -> torch.Tensor:  # calculate_qparams on BF16 block statistics
        s = (amax_b / six).to(torch.bfloat16).float() * gs  # BF16 quotient, exact fp32 product
        s8 = s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.where(s8 == 0, _E4M3_EIGHTH, s8)  # 0 -> 0.125, calculate_qparams' eps for FP8 scales

    return _quantize(w, scale_of_amax, lambda s8: s8 / gs)


def dequantize_ct(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """compressed-tensors decode: ``(fp32(LUT[q]) * fl(fp32(s8) / gs)).to(dtype)``, code 8 = -0.0."""
    return _decode(packed, block_scale, global_scale, "ct", dtype)


def quantize_modelopt(w: torch.Tensor, scale_2: torch.Tensor, *, use_triton: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 rows ``[..., K]`` -> (``weight`` uint8 ``[..., K/2]``, ``weight_scale`` E4M3 ``[..., K/16]``)
    exactly as ModelOpt 0.47's unified HF export writes ``W4A16_NVFP4`` / ``NVFP4`` weights.

    ``scale_2`` is :func:`modelopt_scale_2` of the fused group's amax; ``use_triton`` as in :func:`quantize_ct`.
    """
    if w.is_cuda and use_triton:
        from .triton_nvfp4 import quantize_modelopt_triton

        if (r := quantize_modelopt_triton(w, scale_2)) is not None:
            return r
    w2 = scale_2.reshape(()).to(device=w.device, dtype=torch.float32)
    six_w2 = w2 * E2M1_MAX  # fl(6 * w2) first, as get_weights_scaling_factor does

    def scale_of_amax(amax_b: torch.Tensor) -> torch.Tensor:  # get_weights_scaling_factor
        s = amax_b / six_w2
        s = torch.where(s == 0, torch.ones_like(s), s)
        return s.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)

    return _quantize(w, scale_of_amax, lambda s8: s8 * w2)


def dequantize_modelopt(
    packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """ModelOpt decode (``NVFP4QTensor.dequantize``): ``(LUT[q] * fl(fp32(s8) * w2)).to(dtype)``, code 8 = +0.0.

    compressed-tensors' ``ModelOptNvfp4Converter`` stores ``1 / w2`` and decodes with ``s8 / (1 / w2)``: use
    ``dequantize_ct(packed, block_scale, 1 / scale_2)`` to reproduce that path bit for bit.
    """
    return _decode(packed, block_scale, scale_2, "modelopt", dtype)


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------


def _rows(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    if w.dtype != torch.bfloat16:
        raise TypeError(
            f"NVFP4 quantization takes BF16 weights (the producers' statistics are BF16-exact), got {w.dtype}; "
            "dequantize FP8 to BF16 first"
        )
    if w.ndim < 1 or w.shape[-1] % GROUP != 0:
        raise ValueError(
            f"NVFP4 needs the input dimension K (last dim) to be a multiple of {GROUP}, got shape "
            f"{tuple(w.shape)}; keep this Linear in BF16 and list it in `ignore` / `exclude_modules` "
            "(formats.md §2.4)"
        )
    k = w.shape[-1]
    return w.reshape(-1, k), k


def _step(rows: torch.Tensor) -> int:
    budget = CPU_SUBCHUNK_ELEMS if rows.device.type == "cpu" else GPU_SUBCHUNK_ELEMS
    return max(1, budget // max(1, rows.shape[1]))


def _quantize(w: torch.Tensor, scale_of_amax, eff_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared body: ``scale_of_amax(fp32 block amax) -> E4M3 bytes`` and ``eff_of(fp32 s8) -> fp32 effective
    scale`` are the producer's formulas.  A block scale depends only on the block amax, a BF16 value, so
    the formula runs once over the 32768 BF16 magnitudes and blocks gather from it (8 ms -> 1 ms for
    4096x7168: the fp32 -> E4M3 cast is not vectorised)."""
    rows, k = _rows(w)
    n = rows.shape[0]
    amax_bits = _block_amax_bits(rows)
    mags = torch.arange(32768, dtype=torch.int32, device=w.device).to(torch.int16).view(torch.bfloat16).float()
    s8 = scale_of_amax(mags).index_select(0, amax_bits.view(-1)).view(n, k // GROUP)
    packed = _encode(rows, s8, eff_of)
    lead = w.shape[:-1]
    return packed.view(*lead, k // 2), s8.view(torch.float8_e4m3fn).view(*lead, k // GROUP)


def _block_amax_bits(rows: torch.Tensor) -> torch.Tensor:
    """int32 ``[n, K/16]``: BF16 bit pattern of each block's ``max |x|``.  max_pool1d on fp32 runs at
    2.2 G el/s here, 12x ``amax(-1)`` over a 16-wide last dim (that reduction is not vectorised)."""
    n, k = rows.shape
    out = torch.empty(n, k // GROUP, dtype=torch.int32, device=rows.device)
    bits = rows.view(torch.int16)
    step = _step(rows)
    for a in range(0, n, step):
        b = min(n, a + step)
        mag = torch.bitwise_and(bits[a:b], 0x7FFF).view(torch.bfloat16).float()  # |x|, exact
        amax = F.max_pool1d(mag.view(b - a, 1, k), GROUP, GROUP).view(b - a, k // GROUP)
        # Exact; & 0x7FFF because a NaN may come back with its sign bit set; int16 -> int32 in the copy.
        out[a:b] = amax.to(torch.bfloat16).view(torch.int16) & 0x7FFF
    return out


def _code_tables(eff: torch.Tensor) -> torch.Tensor:
    """uint8 ``[D, 65536]``: the E2M1 code of every BF16 pattern (index = int16 bits + 32768) divided by
    ``eff[d]`` with one IEEE fp32 division and round-half-even, as both producers do."""
    d = eff.shape[0]
    dev = eff.device
    cuts = torch.tensor(_CUTS, dtype=torch.float64, device=dev)
    t = eff.double()[:, None] * cuts  # exact: <= 24 + 26 significant bits
    cand = t.float().to(torch.bfloat16)  # within one BF16 ulp of t (two roundings)
    # First BF16 magnitude strictly above t (positive patterns order like integers).
    thr = cand.view(torch.int16).to(torch.int32) + (cand.double() <= t).to(torch.int32)
    thr = torch.where(t.isnan(), 32768, thr.clamp_(0, 32768))  # NaN scale (NaN weights): codes 0, no crash
    sign_thr, mag_thr = thr[:, :1], thr[:, 1:]
    # mag code of magnitude m = number of thresholds <= m: run lengths between consecutive thresholds.
    edges = torch.cat([torch.zeros(d, 1, dtype=torch.int32, device=dev), mag_thr,
                       torch.full((d, 1), 32768, dtype=torch.int32, device=dev)], dim=1)
    counts = (edges[:, 1:] - edges[:, :-1]).reshape(-1)
    values = torch.arange(8, dtype=torch.uint8, device=dev).repeat(d)
    mag = torch.repeat_interleave(values, counts, output_size=d * 32768).view(d, 32768)
    m = torch.arange(32768, dtype=torch.int32, device=dev)
    neg = mag | ((m >= sign_thr).to(torch.uint8) << 3)  # -0.0 (m = 0) never reaches sign_thr >= 1
    return torch.cat([neg, mag], dim=1)  # int16 bits -32768..-1 are the negatives, 0..32767 positives


def _encode(rows: torch.Tensor, s8: torch.Tensor, eff_of) -> torch.Tensor:
    """Pack the codes of ``rows`` (BF16 ``[n, K]``) whose blocks use E4M3 bytes ``s8`` (uint8 ``[n, K/16]``,
    1..126, 127 = NaN from NaN weights); ``eff_of(fp32 scales) -> fp32`` is the producer's formula."""
    n, k = rows.shape
    dev = rows.device
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
    if n == 0 or k == 0:
        return packed
    if dev.type == "cpu":
        # Only the scale bytes present: ~30 on real weights (64 KiB each), vs 126 possible.
        present = torch.bincount(s8.reshape(-1), minlength=256)[:128] > 0
        codes_used = present.nonzero().view(-1)
    else:
        codes_used = torch.arange(1, 128, device=dev)  # no host sync; 8 MiB of tables is nothing on a GPU
    row_of = torch.zeros(256, dtype=torch.int32, device=dev)
    row_of[codes_used] = torch.arange(codes_used.numel(), dtype=torch.int32, device=dev)
    eff = eff_of(codes_used.to(torch.uint8).view(torch.float8_e4m3fn).float())
    table = _code_tables(eff).view(-1)
    # int32 [n, K/16]: start of the block's table row, + 32768 to index with signed int16 bits.
    off = row_of.index_select(0, s8.view(-1).to(torch.int32)).view(n, k // GROUP).mul_(65536).add_(32768)
    bits = rows.view(torch.int16)
    g = k // GROUP
    step = _step(rows)
    for a in range(0, n, step):
        b = min(n, a + step)
        idx = bits[a:b].to(torch.int32).view(b - a, g, GROUP)
        idx += off[a:b, :, None]
        codes = torch.index_select(table, 0, idx.view(-1)).view(torch.int16)
        # Little-endian int16 pair = even code | odd code << 8; v | v >> 4 puts odd << 4 in the low byte.
        pair = torch.bitwise_right_shift(codes, 4)
        pair |= codes
        packed[a:b].view(-1).copy_(pair)  # int16 -> uint8 keeps the low byte
    return packed


def _decode(packed, block_scale, global_scale, rule: str, dtype: torch.dtype) -> torch.Tensor:
    """Whole-tensor decode into a new tensor (see :func:`decode_box_into`)."""
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected uint8 packed and float8_e4m3fn scales, got {packed.dtype}, {block_scale.dtype}")
    k2 = packed.shape[-1]
    if block_scale.shape[:-1] != packed.shape[:-1] or block_scale.shape[-1] * (GROUP // 2) != k2:
        raise ValueError(f"packed {tuple(packed.shape)} and block scale {tuple(block_scale.shape)} do not match")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"NVFP4 decodes to bf16, fp16 or fp32, not {dtype}")
    out = torch.empty(*packed.shape[:-1], 2 * k2, dtype=dtype, device=packed.device)
    decode_box_into(out, packed, block_scale, global_scale, rule=rule, method="torch")
    return out


RULES = ("ct", "modelopt")


def effective_scales(block_scale: torch.Tensor, global_scale: torch.Tensor, rule: str) -> torch.Tensor:
    """fp32 per-block multipliers, as each producer's decoder forms them: ``"ct"`` ``fl(fp32(s8) / gs)``
    (compressed-tensors ``_process_quantization``: BF16 scale / fp32 ``[1]`` global scale, promoted to fp32),
    ``"modelopt"`` ``fl(fp32(s8) * w2)`` (``NVFP4QTensor.dequantize``: ``scale.float() * double_scale``).
    One IEEE fp32 operation against a device tensor (never a Python float: see the module docstring).
    ``block_scale``: float8_e4m3fn, or fp32 holding E4M3 values."""
    s = block_scale.float()
    g = global_scale.reshape(()).to(device=s.device, dtype=torch.float32)
    if rule == "ct":
        return s / g
    if rule == "modelopt":
        return s * g
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def decode_box_into(out: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                    *, rule: str, method: str = "auto") -> int:
    """Decode a box of packed NVFP4 codes into ``out``, as the producer named by ``rule`` decodes::

        out[.., c] = (fp32(LUT[code(.., c)]) * eff[.., c // 16]).to(out.dtype)     eff = effective_scales(..)

    one fp32 product, one rounding; code 8 is -0.0 for ``"ct"`` (``unpack_fp4_from_uint8`` multiplies by
    -1.0) and +0.0 for ``"modelopt"`` (its ``e2m1_values`` table).

    Args:
        out: ``[..., m]`` BF16 / FP16 / FP32, any strides (e.g. a column range of a DTensor's local shard);
            the box starts on a 16-column block of the tensor.
        packed: uint8 ``[..., m/2]``, any strides (e.g. a page-cache view); low nibble = even column.
        block_scale: ``[..., m/16]`` float8_e4m3fn (or fp32 holding E4M3 values: the GPU pipeline's window).
        global_scale: compressed-tensors ``weight_global_scale`` (``"ct"``) or ModelOpt ``weight_scale_2``.
        method: ``"auto"`` (Triton on CUDA when it can run, else torch), ``"triton"`` or ``"torch"``.

    Returns the largest scratch allocation in bytes.  The torch path gathers two outputs per packed byte from
    a ``[256 scale bytes x 256 packed bytes]`` table of value pairs (256 KiB for BF16) built with the formula
    itself, one row sub-chunk at a time (int32 index: 4 B per packed byte).
    """
    m = out.shape[-1]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (*out.shape[:-1], m // 2) or m % GROUP:
        raise ValueError(f"out {tuple(out.shape)} / packed {tuple(packed.shape)} {packed.dtype}: need uint8 "
                         f"[..., m/2], m a multiple of {GROUP}")
    if tuple(block_scale.shape) != (*out.shape[:-1], m // GROUP):
        raise ValueError(f"block scale {tuple(block_scale.shape)}: need {(*out.shape[:-1], m // GROUP)}")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"NVFP4 decodes to bf16, fp16 or fp32, not {out.dtype}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if out.numel() == 0:
        return 0
    if out.is_cuda and method in ("auto", "triton"):
        from .triton_nvfp4 import decode_triton

        eff = effective_scales(block_scale, global_scale, rule)
        if decode_triton(out, packed, eff, negative_zero=rule == "ct"):
            return eff.nbytes
        if method == "triton":
            raise ValueError("the Triton decode cannot take these inputs (see triton_nvfp4.decode_triton)")
    if out.ndim == 1:
        return decode_box_into(out[None], packed[None], block_scale[None], global_scale, rule=rule, method="torch")
    if out.ndim > 2 and not out.is_contiguous():  # strided stacked experts: one 2-D problem each
        return max(decode_box_into(o, p, s, global_scale, rule=rule, method="torch")
                   for o, p, s in zip(out, packed, block_scale))
    dev = out.device
    s8 = block_scale if block_scale.dtype == torch.float8_e4m3fn else block_scale.to(torch.float8_e4m3fn)
    s8 = s8.view(torch.uint8).reshape(-1, m // GROUP)
    rows = out.reshape(-1, m)  # a view: 2-D, or contiguous N-D
    p = packed.reshape(-1, m // 2)
    lut = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32, device=dev)
    if rule == "modelopt":
        lut[8] = 0.0
    all_scales = torch.arange(256, dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
    vals = (lut[None, :] * effective_scales(all_scales, global_scale, rule)[:, None]).to(out.dtype)  # [256, 16]
    byte = torch.arange(256, device=dev)
    pair_dtype = {2: torch.int32, 4: torch.int64}[out.element_size()]
    table = torch.stack([vals[:, byte & 15], vals[:, byte >> 4]], dim=-1).contiguous().view(pair_dtype).view(-1)
    direct = rows.is_contiguous() and rows.storage_offset() % 2 == 0  # a pair of outputs as one int32/int64
    step = max(1, (CPU_SUBCHUNK_ELEMS if dev.type == "cpu" else GPU_SUBCHUNK_ELEMS) // m)
    peak = 0
    for a in range(0, rows.shape[0], step):
        b = min(rows.shape[0], a + step)
        idx = p[a:b].to(torch.int32).view(b - a, -1, GROUP // 2)
        idx += (s8[a:b].to(torch.int32) * 256)[:, :, None]
        if direct:
            torch.index_select(table, 0, idx.view(-1), out=rows[a:b].view(pair_dtype).view(-1))
            peak = max(peak, idx.nbytes + table.nbytes)
        else:
            got = torch.index_select(table, 0, idx.view(-1))
            rows[a:b].copy_(got.view(out.dtype).view(b - a, m))
            peak = max(peak, idx.nbytes + table.nbytes + got.nbytes)
    return peak
