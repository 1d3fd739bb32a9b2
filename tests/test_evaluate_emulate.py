"""W4A4 activation emulation: equal to compressed-tensors' dynamic fake-quantize, bit for bit, alone and in
the streamed model (whole model with compressed-tensors' quantize-dequantize in its Linears' pre-hooks)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
from torch import nn

import streaming_adapters as sa
from nvfp4_bodies import CT, MO, make_nvfp4
from streaming_adapters.errors import CheckpointError
from streaming_adapters.evaluate.emulate import InputScales, qdq_nvfp4
from test_evaluate import rows, whole_model_logits

ARGS = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations  # tensor_group, 16, dynamic local, E4M3


def ct_qdq(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' forward_quantize for input activations (dynamic="local"), as called in a Linear."""
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=ARGS, module=nn.Identity(), global_scale=gs)
    return fake_quantize(x, scale, zp, ARGS, global_scale=gs)


def activations(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 41, 512, generator=g) * torch.logspace(-4, 3, 512)[torch.randperm(512, generator=g)]
    x[0, 3] = 0.0            # an all-zero row: block scales 0 -> 0.125 (eps), codes 0
    x[1, 5, :16] = -1e-30    # negatives that round to zero (the -0.0 rule)
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("amax_factor", [1.0, 0.25, 4.0])  # calibrated amax equal to / below / above this x's
def test_qdq_equals_compressed_tensors_fake_quantize(seed, amax_factor):
    x = activations(seed)
    amax = x.abs().amax().float() * amax_factor
    gs = (torch.tensor(2688.0) / amax).reshape(1)  # below the data's amax: block scales clamp at 448
    got, want = qdq_nvfp4(x, gs), ct_qdq(x, gs)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bits, incl. the sign of zeros
    assert not torch.equal(got, x)  # it did quantize


def whole_model_emulated_logits(path, samples):
    scales = InputScales(path).scales
    hooks = {}

    def hook_linears(model):
        for name, mod in model.named_modules():
            if name in scales:
                hooks[name] = mod.register_forward_pre_hook(lambda _m, a, g=scales[name]: (ct_qdq(a[0], g),))

    import test_evaluate as te
    orig = te.load_fp8_checkpoint

    def load_and_hook(model, p, **kw):
        rep = orig(model, p, **kw)
        hook_linears(model)
        return rep

    te.load_fp8_checkpoint = load_and_hook
    try:
        out = whole_model_logits(path, samples)
    finally:
        te.load_fp8_checkpoint = orig
    assert len(hooks) == len(scales) == 3 * 6  # q k v o gate up of 3 layers (down: K=200 % 16 != 0)
    return out


@pytest.mark.parametrize("fmt", [CT, MO])
def test_streamed_w4a4_equals_whole_model_with_compressed_tensors_qdq(checkpoints, tmp_path_factory, fmt):
    src = checkpoints("llama", "fp8_block")
    q = make_nvfp4(src, tmp_path_factory.mktemp("w4a4") / fmt, fmt, w4a4=True)
    samples = rows(3, seed=4)
    emu = sa.evaluate(q, samples, emulate_activations=True, keep_logits=True)
    want = whole_model_emulated_logits(q, samples)
    assert all(torch.equal(emu["logits"][j], w) for j, w in enumerate(want))
    plain = sa.evaluate(q, samples, keep_logits=True)
    assert not torch.equal(plain["logits"][0], emu["logits"][0])  # the activations were quantized
    assert emu["emulate_activations"] and emu["nll"] != plain["nll"]


def test_emulation_needs_input_scales(checkpoints, tmp_path):
    src = checkpoints("llama", "fp8_block")
    with pytest.raises(CheckpointError, match="stores no input scales") as e:
        sa.evaluate(src, rows(1), emulate_activations=True)
    assert "fix:" in str(e.value).lower() or "drop emulate_activations" in str(e.value)


# vLLM's CPU emulation of an NVFP4 W4A4 activation (vllm/model_executor/layers/quantization/utils/
# nvfp4_emulation_utils.py, ``ref_nvfp4_quant`` + ``ref_nvfp4_quant_dequant``, vLLM main 2026-11), written
# out here as the independent reference: vLLM itself does not install on this CPU machine.
def _vllm_reciprocal(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (x + (x == 0) * 1e8)


def _vllm_cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    sign, x = torch.sign(x), torch.abs(x)
    for lo, hi, v, closed in ((0.0, 0.25, 0.0, True), (0.25, 0.75, 0.5, False), (0.75, 1.25, 1.0, True),
                              (1.25, 1.75, 1.5, False), (1.75, 2.5, 2.0, True), (2.5, 3.5, 3.0, False),
                              (3.5, 5.0, 4.0, True)):
        x[((x >= lo) & (x <= hi)) if closed else ((x > lo) & (x < hi))] = v
    x[x > 5.0] = 6.0
    return x * sign


def vllm_qdq(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    m, n = x.shape
    xb = x.reshape(m, n // 16, 16)
    vec_max = torch.max(torch.abs(xb), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = torch.clamp(gs * (vec_max * (1 / 6.0)), max=448, min=-448).to(torch.float8_e4m3fn).to(torch.float32)
    out_scale = _vllm_reciprocal(scale * _vllm_reciprocal(gs))
    q = _vllm_cast_to_fp4(torch.clamp(xb.to(torch.float32) * out_scale, -6.0, 6.0).reshape(m, n))
    return (q.reshape(m, n // 16, 16) * (scale / gs)).reshape(m, n).to(x.dtype)


def test_emulation_against_vllms_cpu_emulation():
    # Not the same bits (emulate.py says where the roundings differ), and this test pins how far apart:
    # measured 2026-12-07 on these activations (log-normal rows with 40x outliers): 1.1% of the elements,
    # 1.2% of the 16-blocks differ; relative difference 1.3%, while both round-trips are 8.24% from x.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 1024, generator=g) * torch.exp(torch.randn(4096, 1, generator=g))).to(torch.bfloat16)
    x[::97, ::13] *= 40
    gs = (448 * 6 / x.float().abs().amax()).reshape(1)
    ours, theirs = qdq_nvfp4(x, gs), vllm_qdq(x, gs)
    differ = ours != theirs
    assert 0 < differ.float().mean() < 0.02
    assert differ.reshape(4096, 64, 16).any(-1).float().mean() < 0.02
    err = [float((y.float() - x.float()).norm() / x.float().norm()) for y in (ours, theirs)]
    assert abs(err[0] - err[1]) < 1e-3 * err[0] and 0.05 < err[0] < 0.12
