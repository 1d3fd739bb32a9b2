"""Output formats: which tensors a source tensor becomes, and the config a loader needs.

    bf16                        X.weight BF16; quantization_config removed
    nvfp4 / compressed-tensors  X.weight_packed U8 [N, K/2], X.weight_scale F8_E4M3 [N, K/16],
                                X.weight_global_scale F32 [1]; nvfp4-pack-quantized NVFP4A16 config
                                (formats.md §2.1, as llm-compressor 0.14 writes it)
    nvfp4 / modelopt            X.weight U8 [N, K/2], X.weight_scale F8_E4M3 [N, K/16],
                                X.weight_scale_2 F32 []; W4A16_NVFP4 in config.json and
                                hf_quant_config.json (formats.md §2.2; TensorRT-LLM reads the latter)
    W4A4 (``calibration``)      + X.input_global_scale F32 [1] (compressed-tensors NVFP4, input_activations block)
                                or X.input_scale F32 [] (modelopt quant_algo NVFP4); formats.md §4

Kept out of NVFP4 (and listed in ``ignore`` / ``exclude_modules``): every Linear the source left
unquantized (lm_head, routers, vision tower...), and FP8 weights with ``K % 16 != 0`` (written as BF16).
"""

from __future__ import annotations

import copy
from typing import Any

from .._version import __version__
from ..formats import LogicalTensor
from .layout import OutputTensor

TARGETS = ("bf16", "nvfp4")
NVFP4_FORMATS = ("compressed-tensors", "modelopt")
NVFP4_GROUP = 16
MODELOPT_VERSION = "0.47.0"  # the producer whose math and layout we match


def normalize_target(target: str, fmt: str | None) -> tuple[str, str | None]:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "nvfp4":
        fmt = fmt or "compressed-tensors"
        if fmt not in NVFP4_FORMATS:
            raise ValueError(f"format for nvfp4 must be one of {NVFP4_FORMATS}, got {fmt!r}")
        return target, fmt
    if fmt not in (None, "hf", "bf16"):
        raise ValueError(f"target bf16 takes no format (got {fmt!r})")
    return target, None


def is_linear_weight(lt: LogicalTensor) -> bool:
    """A 2-D ``*.weight`` that is not an embedding: what HF models hold in an nn.Linear."""
    return lt.name.endswith(".weight") and len(lt.shape) == 2 and "embed" not in lt.name


def outputs_for(lt: LogicalTensor, target: str, fmt: str | None, nvfp4: bool, w4a4: bool = False) -> list[OutputTensor]:
    """The output tensors of one logical tensor.  ``nvfp4``: quantize it (decided by the plan); ``w4a4``: and
    give it an activation scale (calibrated)."""
    if lt.scale is None:
        return [OutputTensor(lt.name, lt.stored.dtype, lt.shape, lt.name, "copy")]
    if not nvfp4:
        return [OutputTensor(lt.name, "BF16", lt.shape, lt.name, "dequant")]
    mod = lt.name[: -len(".weight")]
    n, k = lt.shape
    if fmt == "compressed-tensors":
        return [
            OutputTensor(f"{mod}.weight_packed", "U8", (n, k // 2), lt.name, "packed"),
            OutputTensor(f"{mod}.weight_scale", "F8_E4M3", (n, k // NVFP4_GROUP), lt.name, "block_scale"),
            OutputTensor(f"{mod}.weight_global_scale", "F32", (1,), lt.name, "global_scale"),
        ] + ([OutputTensor(f"{mod}.input_global_scale", "F32", (1,), lt.name, "input_scale")] if w4a4 else [])
    return [
        OutputTensor(f"{mod}.weight", "U8", (n, k // 2), lt.name, "packed"),
        OutputTensor(f"{mod}.weight_scale", "F8_E4M3", (n, k // NVFP4_GROUP), lt.name, "block_scale"),
        OutputTensor(f"{mod}.weight_scale_2", "F32", (), lt.name, "global_scale"),
    ] + ([OutputTensor(f"{mod}.input_scale", "F32", (), lt.name, "input_scale")] if w4a4 else [])


def output_config(config: dict[str, Any], target: str, fmt: str | None, ignore: list[str],
                  w4a4: bool = False) -> dict[str, Any]:
    """config.json of the output: the source's, with its quantization_config replaced."""
    cfg = copy.deepcopy(config)
    holder = cfg["text_config"] if "quantization_config" not in cfg and isinstance(cfg.get("text_config"), dict) \
        and "quantization_config" in cfg["text_config"] else cfg
    holder.pop("quantization_config", None)
    if target == "bf16":
        cfg["torch_dtype"] = "bfloat16"
        return cfg
    cfg["quantization_config"] = compressed_tensors_config(ignore, w4a4) if fmt == "compressed-tensors" \
        else modelopt_config(ignore, w4a4)
    return cfg


def compressed_tensors_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    """NVFP4A16 (or, ``w4a4``, NVFP4) as llm-compressor 0.14 serializes it (compressed-tensors 0.19)."""
    cfg = {
        "config_groups": {"group_0": {
            "format": "nvfp4-pack-quantized", "input_activations": None, "output_activations": None,
            "targets": ["Linear"],
            "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 16,
                        "num_bits": 4, "observer": "memoryless_minmax", "observer_kwargs": {},
                        "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                        "type": "float", "zp_dtype": None},
        }},
        "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": list(ignore),
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0",
    }
    if w4a4:  # formats.md §4: the scheme's input_activations, static tensor_group scale, dynamic local blocks
        cfg["config_groups"]["group_0"]["input_activations"] = {
            "actorder": None, "block_structure": None, "dynamic": "local", "group_size": 16, "num_bits": 4,
            "observer": "static_minmax", "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn",
            "strategy": "tensor_group", "symmetric": True, "type": "float", "zp_dtype": None}
    return cfg


def _modelopt_producer() -> dict[str, str]:
    # vLLM / TensorRT-LLM key on the producer name; the extra field says honestly who wrote the file.
    return {"name": "modelopt", "version": MODELOPT_VERSION, "converted_by": f"streaming_adapters {__version__}"}


def modelopt_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    group: dict[str, Any] = {
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP},
        "targets": ["Linear"],
    }
    if w4a4:
        group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP},
                 **group}
    return {
        "config_groups": {"group_0": group},
        "ignore": list(ignore), "quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
        "producer": _modelopt_producer(), "quant_method": "modelopt",
    }


def modelopt_hf_quant_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    return {
        "producer": _modelopt_producer(),
        "quantization": {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
                         "group_size": NVFP4_GROUP, "exclude_modules": list(ignore)},
    }
