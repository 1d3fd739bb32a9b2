"""W4A4 activation emulation: NVFP4 quantize-dequantize of each quantized Linear's input, in a pre-hook.

The runtime math of a W4A4 NVFP4 Linear as compressed-tensors' ``forward_quantize`` with ``dynamic="local"``
writes it (formats.md §2): per 16 input columns a dynamic block scale
``s8 = e4m3(gs * bf16(amax_b / 6))`` (0 -> 0.125) under the stored global scale ``gs``, codes
``e2m1(x / (s8 / gs))``, then ``x' = bf16(LUT[q] * fl(s8 / gs))``.  That is exactly the weight path
``numerics.nvfp4.quantize_ct`` / ``dequantize_ct`` already matches bit for bit, applied to the activation
rows with the *input* global scale, so the same code runs here (tests/test_evaluate_emulate.py checks it
against compressed-tensors' ``compute_dynamic_scales_and_zp`` + ``fake_quantize``).

vLLM's emulation (``nvfp4_emulation_utils.ref_nvfp4_quant``, and its Triton twin on a GPU) runs the same steps
with two roundings placed differently: the block scale from the fp32 ``amax * fl(1/6)`` (not BF16 ``amax / 6``),
and the codes from ``x * (gs / s8)`` (not ``x / (s8 / gs)``).  A block whose ``amax / 6`` is not a BF16 value
can get the neighbouring E4M3 scale, and a value at a code boundary the neighbouring code.  Measured against
vLLM's CPU emulation (tests/test_evaluate_emulate.py::test_emulation_against_vllms_cpu_emulation, 2026-12-07):
1.1% of the elements differ, and both round trips are 8.24% (relative L2) from the activations: the same
quality, not the same bits.

Where the scale comes from: compressed-tensors stores ``<module>.input_global_scale`` (= gs); ModelOpt stores
``<module>.input_scale`` (= amax / 2688), which vLLM's ``ModelOptNvFp4LinearMethod`` turns into
``input_global_scale_inv = 1.0 / input_scale.max()`` (fp32, the max over a fused q/k/v or gate/up group) and
quantizes with: we take the same fp32 reciprocal (the fused members' scales are equal in our outputs).

Memory: one activation's codes and block scales (5/16 bytes per element) next to the activation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..numerics.nvfp4 import dequantize_ct, quantize_ct

BLOCK = 16  # NVFP4 block width (columns per E4M3 scale)


def qdq_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake-quantize of BF16 activations ``[..., K]`` (K % 16 == 0) under ``global_scale``."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    packed, s8 = quantize_ct(rows, global_scale)
    return dequantize_ct(packed, s8, global_scale, x.dtype).reshape(shape)


class InputScales:
    """The stored input global scale of every W4A4 Linear of a checkpoint (module name -> fp32 [1])."""

    def __init__(self, checkpoint: str | Path) -> None:
        from safetensors import safe_open

        self.checkpoint = Path(checkpoint)
        self.scales: dict[str, torch.Tensor] = {}
        found: dict[str, torch.Tensor] = {}
        for f in sorted(self.checkpoint.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key.endswith((".input_global_scale", ".input_scale", ".weight_scale_2")):
                        found[key] = fh.get_tensor(key).float().reshape(1)
        for key, v in found.items():
            if key.endswith(".input_global_scale"):  # compressed-tensors: gs itself
                self.scales[key[: -len(".input_global_scale")]] = v
            elif key.endswith(".input_scale") and key[: -len("input_scale")] + "weight_scale_2" in found:
                # ModelOpt NVFP4 (weight_scale_2 marks it; an FP8 ModelOpt input_scale is not ours):
                # input_scale = amax / 2688, and vLLM runs gs = 1 / input_scale (fp32 reciprocal).
                self.scales[key[: -len(".input_scale")]] = 1.0 / v

    def __len__(self) -> int:
        return len(self.scales)

    def require(self) -> None:
        if not self.scales:
            raise CheckpointError("emulate_activations needs a W4A4 checkpoint, and this one stores no input "
                                  "scales", file=str(self.checkpoint), tensor="*.input_global_scale / *.input_scale",
                                  expected="an NVFP4 (W4A4) checkpoint: compressed-tensors NVFP4 or ModelOpt NVFP4",
                                  fix="drop emulate_activations (weight-only checkpoints quantize no activations), "
                                  "or convert with calibration (docs/calibration.md)")


def add_hooks(linears: dict[str, nn.Linear], scales: InputScales) -> list:
    """Forward-pre hooks quantize-dequantizing the input of every Linear of ``linears`` that has a scale."""
    hooks = []
    for name, mod in linears.items():
        gs = scales.scales.get(name)
        if gs is None:
            continue
        if mod.in_features % BLOCK:
            raise CheckpointError(f"{name} has {mod.in_features} input columns, not whole NVFP4 blocks",
                                  file=str(scales.checkpoint), tensor=name, expected="in_features % 16 == 0",
                                  fix="this checkpoint was not written by an NVFP4 producer; evaluate without "
                                  "emulate_activations")
        g = gs.to(mod.weight.device)
        hooks.append(mod.register_forward_pre_hook(lambda _m, args, g=g: (qdq_nvfp4(args[0], g), *args[1:])))
    return hooks
