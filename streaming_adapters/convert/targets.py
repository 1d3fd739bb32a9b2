"""Deprecated: the output formats moved to :mod:`streaming_adapters.formats.outputs` (one ``OutputTarget``
per format).  The old public names stay here as thin wrappers over the targets and warn once per call
site; they will be removed in a later release."""

from __future__ import annotations

import warnings
from typing import Any

from ..formats.outputs import MODELOPT_VERSION, get_target, resolve_target  # noqa: F401 -- re-exported
from ..formats.outputs import is_linear_weight  # noqa: F401 -- re-exported, unchanged
from ..numerics.nvfp4 import GROUP as NVFP4_GROUP  # noqa: F401 -- re-exported

TARGETS = ("bf16", "nvfp4")
NVFP4_FORMATS = ("compressed-tensors", "modelopt")


def _moved(old: str, new: str) -> None:
    warnings.warn(f"streaming_adapters.convert.targets.{old} is deprecated; use "
                  f"streaming_adapters.formats.outputs: {new}", DeprecationWarning, stacklevel=3)


def normalize_target(target: str, fmt: str | None) -> tuple[str, str | None]:
    _moved("normalize_target", "resolve_target(target, fmt) -> OutputTarget (.target, .format)")
    t = resolve_target(target, fmt)
    return t.target, t.format


def outputs_for(lt, target: str, fmt: str | None, nvfp4: bool, w4a4: bool = False):
    _moved("outputs_for", "resolve_target(target, fmt).outputs_for(lt, quantize, w4a4)")
    return resolve_target(target, fmt).outputs_for(lt, nvfp4, w4a4)


def output_config(config: dict[str, Any], target: str, fmt: str | None, ignore: list[str],
                  w4a4: bool = False) -> dict[str, Any]:
    _moved("output_config", "resolve_target(target, fmt).output_files(config, ignore, w4a4)['config.json']")
    return resolve_target(target, fmt).output_files(config, ignore, w4a4)["config.json"]


def compressed_tensors_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    _moved("compressed_tensors_config", "get_target('compressed-tensors').quantization_config(ignore, w4a4)")
    return get_target("compressed-tensors").quantization_config(list(ignore), w4a4)


def modelopt_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    _moved("modelopt_config", "get_target('modelopt').quantization_config(ignore, w4a4)")
    return get_target("modelopt").quantization_config(list(ignore), w4a4)


def modelopt_hf_quant_config(ignore: list[str], w4a4: bool = False) -> dict[str, Any]:
    _moved("modelopt_hf_quant_config", "get_target('modelopt').hf_quant_config(ignore, w4a4)")
    return get_target("modelopt").hf_quant_config(list(ignore), w4a4)
