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
