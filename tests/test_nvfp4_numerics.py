"""NVFP4 numerics against the producers' own code.

* compressed-tensors: the real code path of llm-compressor 0.14 (``generate_gparam`` / ``calculate_qparams``
  with the observer's BF16 statistics, a Linear initialised by ``initialize_module_for_quantization``,
  ``NVFP4PackedCompressor.compress``), bit for bit, plus every BF16 pattern x every E4M3 scale byte through
  its ``quantize`` + ``pack_fp4_to_uint8``.  The observer glue (~10 lines of llmcompressor/observers/base.py
  and min_max.py) is re-typed in :func:`_llmcompressor_compress` because llm-compressor itself is not a
  test dependency; a one-off run of ``ModelFreePtqConverter`` (llm-compressor 0.14.0 with compressed-tensors
  0.19.0 and 0.20.0) gave identical bytes, fused q/k/v and gate/up global scales included.
* ModelOpt: its package is not installed here and its import needs ``pulp`` and more, so the ModelOpt
  tests compare against ``tests/nvfp4_reference.py``, an independent scalar re-derivation of formats.md
  §2.2.  When a ``modelopt`` package is importable (``pip install --no-deps nvidia-modelopt==0.47.0`` is
  enough), :func:`test_modelopt_matches_real_nvfp4qtensor` also loads its real ``nvfp4_tensor.py`` and
  compares bit for bit (it passed against 0.47.0 when this was written).  The CUDA ``amax / 2688`` rounding
  (``producer_device="cuda"``) is checked against numpy, not against a GPU.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import nvfp4_reference as ref
from helpers import assert_bit_equal
from streaming_adapters.numerics import nvfp4 as nv

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import generate_gparam  # noqa: E402

from producers import SCHEME, llmcompressor_compress, load_modelopt_nvfp4  # noqa: E402
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _special_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows plus the edge cases: zero rows/blocks, values that underflow the E4M3 block scale,
    -0.0, tiny negatives, outliers."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    w[0] = 0
    w[1, :16] = 0
    w[2, 16:32] *= 1e-12  # block scale underflows to 0 -> 0.125 (CT) / 2**-9 (ModelOpt)
    w[3, :8] = -0.0
    w[3, 8:16] = -1e-30  # tiny negatives: code 0x8
    w[4, 5] = 3.0  # outlier: most blocks use small scale bytes
    w[5, ::3] = -w[5, ::3]
    return w


def _tie_weight() -> torch.Tensor:
    """Row 0 carries the tensor amax 2.625 = 2688 / 1024, so gs = 1024 exactly; row 1's first block has amax
    6/1024, so its scale is 1.0 and eff = 1/1024: every tie value t/1024 is exact in BF16 and in the quotient."""
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    w[0, 0] = 2.625
    block = [6.0] + TIES + [-t for t in TIES] + [-0.0]
    w[1, :16] = torch.tensor(block) / 1024
    w[1, 16:] = torch.linspace(-0.004, 0.004, 16)
    return w


# --------------------------------------------------------------------------------------------------
# compressed-tensors / llm-compressor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16), (33, 160), (64, 2048), (96, 7168)])
def test_ct_matches_llmcompressor(shape):
    n, k = shape
    w = _special_weight(max(n, 8), k, seed=n)[-n:]
    want = llmcompressor_compress([w])[0]
    gs = nv.ct_global_scale(nv.tensor_amax(w))
    packed, scale = nv.quantize_ct(w, gs)
    assert_bit_equal(gs, want["weight_global_scale"], "global scale")
    assert_bit_equal(u8(scale), u8(want["weight_scale"]), "block scale")
    assert_bit_equal(packed, want["weight_packed"], "packed")
    # And the real decompressor reads our bytes exactly as dequantize_ct does.
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gs}
    got = NVFP4PackedCompressor.decompress(sd, SCHEME)
    assert_bit_equal(nv.dequantize_ct(packed, scale, gs), got["weight"], "decode")


def test_ct_fused_group_shares_the_global_scale():
    g = torch.Generator().manual_seed(3)
    sizes = ((256, 0.02), (64, 0.3), (64, 0.01))
    q, k, v = ((torch.randn(n, 256, generator=g) * s).to(torch.bfloat16) for n, s in sizes)
    want = llmcompressor_compress([q, k, v])
    amax = torch.stack([nv.tensor_amax(t) for t in (q, k, v)]).max()
    gs = nv.ct_global_scale(amax)
    for t, wnt in zip((q, k, v), want):
        packed, scale = nv.quantize_ct(t, gs)
        assert_bit_equal(gs, wnt["weight_global_scale"], "global scale")
        assert_bit_equal(u8(scale), u8(wnt["weight_scale"]), "block scale")
        assert_bit_equal(packed, wnt["weight_packed"], "packed")


def test_ct_ties_and_signs():
    w = _tie_weight()
    gs = nv.ct_global_scale(nv.tensor_amax(w))
    assert gs.item() == 1024.0
    packed, scale = nv.quantize_ct(w, gs)
    assert u8(scale)[1, 0].item() == 0x38  # E4M3 1.0
    assert u8(scale)[0, 1].item() == 0x20  # all-zero block: 0.125
    nibbles = torch.stack([packed[1, :8] & 15, packed[1, :8] >> 4], dim=1).reshape(-1).tolist()
    # 6 -> 7; ties 0.25 0.75 1.25 1.75 2.5 3.5 5 -> 0 2 2 4 4 6 6 (half to even); negatives | 8; -0.0 -> 0.
    assert nibbles == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]
    want = llmcompressor_compress([w])[0]
    assert_bit_equal(packed, want["weight_packed"], "packed")
    assert_bit_equal(u8(scale), u8(want["weight_scale"]), "block scale")


def test_ct_global_scale_rounding():
    """``2688 / amax`` is ``amax.reciprocal() * 2688`` in BF16 (formats.md's ``bf16(2688 / amax)`` is wrong
    for ~27% of amax values), over every positive finite BF16 amax, against ``generate_gparam``."""
    amax = torch.arange(0, 0x7F80, 7, dtype=torch.int16).view(torch.bfloat16)  # 4663 amax values, 0 included
    want = torch.cat([generate_gparam(-a.reshape(1), a.reshape(1)) for a in amax])
    got = torch.cat([nv.ct_global_scale(a) for a in amax])
    assert_bit_equal(got, want, "gs")
    naive = torch.nan_to_num((2688.0 / amax.float()).to(torch.bfloat16).float(), posinf=1.0)
    assert (naive != want).float().mean() > 0.2
    example = torch.tensor(2688 / 31638.07, dtype=torch.bfloat16)
    assert nv.ct_global_scale(example).item() == 31616.0
    assert nv.ct_global_scale(torch.tensor(0.0, dtype=torch.bfloat16)).item() == 1.0


@pytest.mark.parametrize("gs", [31616.0, 90.0, 1.0, 2.0**-100, 2.0**120])
def test_ct_code_tables_exhaustive(gs):
    """Every BF16 pattern (NaNs excluded) x every E4M3 block scale byte 1..126, through compressed-tensors'
    own ``quantize`` + ``pack_fp4_to_uint8``: the code tables are exact for any effective scale."""
    gsf = torch.tensor([gs], dtype=torch.float32)
    s8 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn)
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).repeat(126, 1)
    q = ct_quantize(x=x, scale=s8.to(torch.bfloat16)[:, None].repeat(1, 4096), zero_point=None,
                    args=SCHEME.weights, global_scale=gsf)
    want = unpack_fp4_from_uint8(pack_fp4_to_uint8(q), 126, 65536, dtype=torch.float32)
    got_codes = nv._code_tables(s8.float() / gsf).long()
    got = torch.tensor(ref.E2M1 + [-0.0] + [-v for v in ref.E2M1[1:]])[got_codes]
    finite = (torch.arange(-32768, 32768).bitwise_and(0x7FFF) <= 0x7F80).expand(126, -1)
    assert_bit_equal(got[finite], want[finite], f"codes at gs={gs}")


# --------------------------------------------------------------------------------------------------
# ModelOpt
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16), (6, 48), (12, 96)])
@pytest.mark.parametrize("device_rule", ["cuda", "cpu"])
def test_modelopt_matches_reference(shape, device_rule):
    w = _special_weight(12, 96, 7)[12 - shape[0]:, : shape[1]].contiguous()
    w2 = nv.modelopt_scale_2(nv.tensor_amax(w), producer_device=device_rule)
    w2_ref = ref.modelopt_scale_2(float(nv.tensor_amax(w)), device_rule)
    assert w2.item() == float(w2_ref)
    packed, scale = nv.quantize_modelopt(w, w2)
    p_ref, s_ref = ref.quantize_modelopt(w, w2_ref)
    assert packed.tolist() == p_ref
    assert u8(scale).tolist() == s_ref
    assert nv.dequantize_modelopt(packed, scale, w2).float().tolist() == ref.dequantize_modelopt(p_ref, s_ref, w2_ref)


def test_modelopt_ties():
    w = _tie_weight()
    w2 = torch.tensor(2.0**-10)  # explicit scale_2, as ModelOpt's quantize(weights_scaling_factor_2=...) takes
    packed, scale = nv.quantize_modelopt(w, w2)
    assert u8(scale)[1, 0].item() == 0x38  # 6/1024 / (6 * 2**-10) = 1.0
    assert u8(scale)[0, 1].item() == 0x38  # all-zero block: 0 -> 1.0
    nibbles = torch.stack([packed[1, :8] & 15, packed[1, :8] >> 4], dim=1).reshape(-1).tolist()
    assert nibbles == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]
    p_ref, s_ref = ref.quantize_modelopt(w, np.float32(2.0**-10))
    assert packed.tolist() == p_ref and u8(scale).tolist() == s_ref


def test_modelopt_scale_2_device_rule():
    """CUDA runs ``amax / 2688.0`` as ``amax * fp32(1/2688)`` (torch ``div_true_kernel_cuda``, divisor a CPU
    scalar); the CPU divides.  Over every positive BF16 amax, against numpy fp32."""
    amax = torch.arange(1, 0x7F80, dtype=torch.int16).view(torch.bfloat16)
    a = amax.float().numpy()
    cuda = nv.modelopt_scale_2(amax[1234])  # scalar API; vectorised check below through the formula
    assert cuda.item() == float(np.float32(a[1234]) * np.float32(1 / 2688))
    got_cuda = torch.stack([nv.modelopt_scale_2(x) for x in amax[::61]])
    got_cpu = torch.stack([nv.modelopt_scale_2(x, producer_device="cpu") for x in amax[::61]])
    assert np.array_equal(got_cuda.numpy(), a[::61] * np.float32(1 / 2688))
    assert np.array_equal(got_cpu.numpy(), a[::61] / np.float32(2688))
    assert (got_cuda != got_cpu).float().mean() > 0.1
    with pytest.raises(ValueError):
        nv.modelopt_scale_2(amax[0], producer_device="tpu")


@pytest.mark.parametrize("w2", [2.0**-10, 3.1e-5, 0.0123])
def test_modelopt_code_tables_exhaustive(w2):
    """Every BF16 pattern x every scale byte with ModelOpt's ``eff = fl(s8 * w2)``, against its formulation
    re-typed: one fp32 division, ``searchsorted`` on the bounds, +1 at the bounds 0.75 / 1.75 / 3.5."""
    w2t = torch.tensor(w2, dtype=torch.float32)
    eff = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float() * w2t
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    q = x.float()[None, :] / eff[:, None]
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    a = q.abs()
    want = (q < 0).to(torch.uint8) << 3
    want += torch.searchsorted(bounds, a, out_int32=True).to(torch.uint8)
    want += ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(torch.uint8)
    finite = (torch.arange(-32768, 32768).bitwise_and(0x7FFF) <= 0x7F80).expand(126, -1)
    assert_bit_equal(nv._code_tables(eff)[finite], want[finite], f"codes at w2={w2}")


def test_modelopt_through_compressed_tensors_converter():
    """ModelOpt bytes -> ``ModelOptNvfp4Converter`` (stores ``1 / w2``) -> ``NVFP4PackedCompressor.decompress``.

    The converter writes a 0-dim ``weight_global_scale``; compressed-tensors then divides a BF16 scale by a
    0-dim tensor, which does not take part in type promotion, so that decode runs in BF16 (14% of elements
    off by up to 0.7% here).  With the ``[1]`` shape llm-compressor itself writes, the decode is
    ``dequantize_ct(packed, scale, 1 / w2)`` exactly, and equals ModelOpt's own decode except where
    ``fl(s8 / fl(1 / w2)) != fl(s8 * w2)`` changes a BF16 rounding (~0.1% of distinct values)."""
    w = _special_weight(64, 512, 11)
    w2 = nv.modelopt_scale_2(nv.tensor_amax(w))
    packed, scale = nv.quantize_modelopt(w, w2)
    tensors = {"model.layers.0.mlp.down_proj.weight": packed, "model.layers.0.mlp.down_proj.weight_scale": scale,
               "model.layers.0.mlp.down_proj.weight_scale_2": w2}
    conv = ModelOptNvfp4Converter().process(dict(tensors))
    sd = {k.rpartition(".")[2]: v for k, v in conv.items()}
    assert sd["weight_packed"] is packed and sd["weight_global_scale"].shape == ()
    raw = NVFP4PackedCompressor.decompress(sd, SCHEME)["weight"]
    sd["weight_global_scale"] = sd["weight_global_scale"].reshape(1)
    got = NVFP4PackedCompressor.decompress(sd, SCHEME)["weight"]
    assert_bit_equal(nv.dequantize_ct(packed, scale, 1 / w2), got, "converter decode")
    mine = nv.dequantize_modelopt(packed, scale, w2)
    assert torch.equal(mine, got)  # values (ModelOpt's code 8 is +0.0, compressed-tensors' -0.0)
    rel = ((raw.float() - mine.float()).abs() / mine.float().abs().clamp_min(1e-30)).max()
    assert rel < 2**-6


def test_modelopt_matches_real_nvfp4qtensor():
    Q = load_modelopt_nvfp4()
    if Q is None:
        pytest.skip("modelopt not importable: compared against tests/nvfp4_reference.py only")
    for shape, seed in (((33, 160), 1), ((64, 2048), 2), ((2, 32), 3)):
        w = _special_weight(*shape, seed) if shape[0] > 8 else _tie_weight()
        qt, s, w2 = Q.quantize(w, 16)  # CPU: weight_scale_2 from an IEEE division
        mine_w2 = nv.modelopt_scale_2(nv.tensor_amax(w), producer_device="cpu")
        assert_bit_equal(mine_w2, w2, "scale_2")
        packed, scale = nv.quantize_modelopt(w, mine_w2)
        assert_bit_equal(packed, qt._quantized_data, "packed")
        assert_bit_equal(u8(scale), u8(s), "block scale")
        deq = qt.dequantize(dtype=torch.bfloat16, scale=s, double_scale=w2, block_sizes={-1: 16})
        assert_bit_equal(nv.dequantize_modelopt(packed, scale, mine_w2), deq, "decode")
        # A GPU export's scale_2 (reciprocal multiply), passed explicitly as ModelOpt's export does.
        w2c = nv.modelopt_scale_2(nv.tensor_amax(w))
        qt, s, _ = Q.quantize(w, 16, None, w2c)
        packed, scale = nv.quantize_modelopt(w, w2c)
        assert_bit_equal(packed, qt._quantized_data, "packed (cuda scale_2)")
        assert_bit_equal(u8(scale), u8(s), "block scale (cuda scale_2)")
    # The all-zero bug we guard: ModelOpt emits NaN block scales and 0x77 bytes.
    qt, s, w2 = Q.quantize(torch.zeros(2, 32, dtype=torch.bfloat16), 16)
    assert w2.item() == 0 and bool(s.float().isnan().all()) and bool((qt._quantized_data == 0x77).all())


# --------------------------------------------------------------------------------------------------
# Both formats
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ct", "modelopt"])
def test_row_chunks_give_the_same_bytes(fmt, monkeypatch):
    w = _special_weight(300, 512, 5)
    amax = nv.tensor_amax(w)
    quant = (lambda t: nv.quantize_ct(t, nv.ct_global_scale(amax))) if fmt == "ct" else (
        lambda t: nv.quantize_modelopt(t, nv.modelopt_scale_2(amax)))
    whole_p, whole_s = quant(w)
    monkeypatch.setattr(nv, "CPU_SUBCHUNK_ELEMS", 3000)  # several row sub-chunks per call, ragged last one
    parts = [quant(w[a:b]) for a, b in ((0, 1), (1, 8), (8, 137), (137, 300))]
    assert_bit_equal(torch.cat([p for p, _ in parts]), whole_p, "packed")
    assert_bit_equal(u8(torch.cat([s for _, s in parts])), u8(whole_s), "scale")
    # Leading dims (stacked experts) are rows too.
    p3, s3 = quant(w[:300].view(3, 100, 512))
    assert_bit_equal(p3.reshape(300, 256), whole_p, "packed 3d")


def test_all_zero_tensor():
    z = torch.zeros(4, 64, dtype=torch.bfloat16)
    z[1, 3] = -0.0
    gs = nv.ct_global_scale(nv.tensor_amax(z))
    packed, scale = nv.quantize_ct(z, gs)
    assert gs.tolist() == [1.0] and bool((u8(scale) == 0x20).all()) and bool((packed == 0).all())
    want = llmcompressor_compress([z])[0]
    assert_bit_equal(packed, want["weight_packed"], "packed")
    assert_bit_equal(u8(scale), u8(want["weight_scale"]), "scale")
    assert_bit_equal(gs, want["weight_global_scale"], "gs")
    assert bool((nv.dequantize_ct(packed, scale, gs) == 0).all())

    w2 = nv.modelopt_scale_2(nv.tensor_amax(z))
    packed, scale = nv.quantize_modelopt(z, w2)
    assert w2.item() == 1.0 and bool((u8(scale) == 0x38).all()) and bool((packed == 0).all())
    for out in (nv.dequantize_modelopt(packed, scale, w2), nv.dequantize_ct(packed, scale, 1 / w2)):
        assert not bool(out.isnan().any()) and bool((out == 0).all())


def test_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        nv.quantize_ct(torch.zeros(4, 24, dtype=torch.bfloat16), torch.ones(1))
    with pytest.raises(ValueError, match="multiple of 16"):
        nv.quantize_modelopt(torch.zeros(4, 8, dtype=torch.bfloat16), torch.tensor(1.0))
    with pytest.raises(TypeError, match="BF16"):
        nv.quantize_ct(torch.zeros(4, 32, dtype=torch.float16), torch.ones(1))
    with pytest.raises(ValueError, match="do not match"):
        nv.dequantize_ct(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 3).to(torch.float8_e4m3fn), torch.ones(1))
    assert nv.tensor_amax(torch.zeros(0, 16, dtype=torch.bfloat16)).item() == 0.0
    p, s = nv.quantize_ct(torch.zeros(0, 32, dtype=torch.bfloat16), torch.ones(1))
    assert p.shape == (0, 16) and s.shape == (0, 2)
