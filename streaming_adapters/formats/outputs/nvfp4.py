"""NVFP4 outputs (W4A16, or W4A4 with calibrated activation scales), as each producer writes them:

    compressed-tensors  X.weight_packed U8 [N, K/2], X.weight_scale F8_E4M3 [N, K/16],
                        X.weight_global_scale F32 [1]; nvfp4-pack-quantized NVFP4A16 config
                        (formats.md §2.1, as llm-compressor 0.14 writes it)
    modelopt            X.weight U8 [N, K/2], X.weight_scale F8_E4M3 [N, K/16], X.weight_scale_2 F32 [];
                        W4A16_NVFP4 in config.json and hf_quant_config.json (formats.md §2.2; TensorRT-LLM
                        reads the latter)
    W4A4                + X.input_global_scale F32 [1] (compressed-tensors NVFP4, input_activations block)
                        or X.input_scale F32 [] (modelopt quant_algo NVFP4); formats.md §4

Kept out of NVFP4 (and listed in ``ignore`` / ``exclude_modules``): every Linear the source left
unquantized (lm_head, routers, vision tower...), and FP8 weights with ``K % 16 != 0`` (written as BF16).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..._version import __version__
from ...numerics import nvfp4
from .base import OutputTarget, OutputTensor, register_target, without_quantization

MODELOPT_VERSION = "0.47.0"  # the producer whose math and layout we match


class NVFP4Target(OutputTarget):
    """What both NVFP4 formats share: which weights quantize, the three (four) outputs per weight."""

    target = "nvfp4"
    quantizes = True
    #: output names relative to the module: packed codes, block scales, global scale, input scale (W4A4)
    suffixes: ClassVar[tuple[str, str, str, str]] = ("", "", "", "")
    #: shapes of the global and input scale ([1] or 0-dim)
    scale_shape: ClassVar[tuple[int, ...]] = ()

    def can_quantize(self, lt) -> bool:
        # 16 consecutive input columns share one block scale: a K that is not a multiple stays BF16.
        return lt.scale is not None and len(lt.shape) == 2 and lt.shape[1] % nvfp4.GROUP == 0

    def quantized_outputs(self, lt, w4a4: bool) -> list[OutputTensor]:
        mod = lt.name[: -len(".weight")]
        n, k = lt.shape
        p, s, g, i = (f"{mod}.{x}" for x in self.suffixes)
        return [
            OutputTensor(p, "U8", (n, k // 2), lt.name, "packed"),
            OutputTensor(s, "F8_E4M3", (n, k // nvfp4.GROUP), lt.name, "block_scale"),
            OutputTensor(g, "F32", self.scale_shape, lt.name, "global_scale"),
        ] + ([OutputTensor(i, "F32", self.scale_shape, lt.name, "input_scale")] if w4a4 else [])

    #: (global scale of an amax, quantize rows, decode rows): the producer's functions in numerics/nvfp4.py
    _math: ClassVar[tuple[Any, Any, Any]]

    def global_scale(self, amax):
        return self._math[0](amax)

    def quantize(self, rows, global_scale):
        return self._math[1](rows, global_scale)

    def decode(self, packed, block_scale, global_scale):
        return self._math[2](packed, block_scale, global_scale)

    def quantized_parts(self, module, index):
        p, s, g, _ = (f"{module}.{x}" for x in self.suffixes)
        if g not in index:  # the global scale is the one name only a quantized module has
            return None
        return index[p], index[s], index[g]

    @property
    def input_scale_suffix(self) -> str:
        return "." + self.suffixes[3]

    def output_files(self, source_config, ignore, w4a4=False) -> dict[str, dict[str, Any]]:
        cfg = without_quantization(source_config)
        cfg["quantization_config"] = self.quantization_config(list(ignore), w4a4)
        return {"config.json": cfg}

    def quantization_config(self, ignore: list[str], w4a4: bool) -> dict[str, Any]:
        raise NotImplementedError


@register_target
class CompressedTensorsTarget(NVFP4Target):
    name = "compressed-tensors"
    description = "NVFP4 nvfp4-pack-quantized (llm-compressor 0.14 / compressed-tensors 0.19)"
    suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    scale_shape = (1,)

    _math = (nvfp4.ct_global_scale, nvfp4.quantize_ct, nvfp4.dequantize_ct)

    def input_scale(self, amax: float) -> torch.Tensor:
        # generate_gparam(amax): the weight's global-scale function on the BF16 activation amax (formats.md §4)
        return nvfp4.ct_global_scale(torch.tensor(amax, dtype=torch.float32).to(torch.bfloat16))

    @classmethod
    def detect(cls, config) -> bool:
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "nvfp4-pack-quantized"

    def is_w4a4(self, config) -> bool:
        qc = config.get("quantization_config") or {}
        return any(g.get("input_activations") for g in (qc.get("config_groups") or {}).values())

    def quantization_config(self, ignore, w4a4):
        """NVFP4A16 (or, ``w4a4``, NVFP4) as llm-compressor 0.14 serializes it (compressed-tensors 0.19)."""
        cfg = {
            "config_groups": {"group_0": {
                "format": "nvfp4-pack-quantized", "input_activations": None, "output_activations": None,
                "targets": ["Linear"],
                "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                            "group_size": nvfp4.GROUP, "num_bits": 4, "observer": "memoryless_minmax",
                            "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group",
                            "symmetric": True, "type": "float", "zp_dtype": None},
            }},
            "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": list(ignore),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": "0.19.0",
        }
        if w4a4:  # formats.md §4: the scheme's input_activations, static tensor_group scale, dynamic local blocks
            cfg["config_groups"]["group_0"]["input_activations"] = {
                "actorder": None, "block_structure": None, "dynamic": "local", "group_size": nvfp4.GROUP,
                "num_bits": 4, "observer": "static_minmax", "observer_kwargs": {},
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                "type": "float", "zp_dtype": None}
        return cfg


def _modelopt_producer() -> dict[str, str]:
    # vLLM / TensorRT-LLM key on the producer name; the extra field says honestly who wrote the file.
    return {"name": "modelopt", "version": MODELOPT_VERSION, "converted_by": f"streaming_adapters {__version__}"}


@register_target
class ModelOptTarget(NVFP4Target):
    name = "modelopt"
    description = "NVFP4 W4A16_NVFP4 / NVFP4 (ModelOpt 0.47 unified HF export, hf_quant_config.json)"
    suffixes = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    scale_shape = ()

    _math = (nvfp4.modelopt_scale_2, nvfp4.quantize_modelopt, nvfp4.dequantize_modelopt)

    def input_scale(self, amax: float) -> torch.Tensor:
        a = torch.tensor(amax, dtype=torch.float32)
        if amax == 0 or math.isnan(amax):
            # ModelOpt (export/quant_utils) replaces a zero / NaN activation amax by 6 with a warning.
            a = torch.tensor(6.0, dtype=torch.float32)
        return nvfp4.modelopt_scale_2(a)

    @classmethod
    def detect(cls, config) -> bool:
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == "modelopt" and "NVFP4" in str(qc.get("quant_algo"))

    def is_w4a4(self, config) -> bool:
        return (config.get("quantization_config") or {}).get("quant_algo") == "NVFP4"

    def quantization_config(self, ignore, w4a4):
        group: dict[str, Any] = {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": nvfp4.GROUP},
            "targets": ["Linear"],
        }
        if w4a4:
            group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float",
                                           "group_size": nvfp4.GROUP}, **group}
        return {
            "config_groups": {"group_0": group},
            "ignore": list(ignore), "quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
            "producer": _modelopt_producer(), "quant_method": "modelopt",
        }

    def hf_quant_config(self, ignore: list[str], w4a4: bool) -> dict[str, Any]:
        return {
            "producer": _modelopt_producer(),
            "quantization": {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
                             "group_size": nvfp4.GROUP, "exclude_modules": list(ignore)},
        }

    def output_files(self, source_config, ignore, w4a4=False):
        return {**super().output_files(source_config, ignore, w4a4),
                "hf_quant_config.json": self.hf_quant_config(list(ignore), w4a4)}
