"""One decorator registry of scale-format adapters, keyed on ``(quant_method, layout)``.

    @register_adapter
    class MyFP8(StreamingFP8StateDictAdapter):
        quant_method = "my_fp8"
        layout = "channel"
        scale_suffixes = ("qscale_weight",)
        def scale_block(self, weight, scale):
            return (1, weight.shape[1])          # one scale per output row

``get_adapter`` picks, among the adapters registered for the checkpoint's ``quant_method``, the one whose
``detect()`` accepts the checkpoint (e.g. ``fp8`` with 2-D scale grids is ``fp8/block``, with 0-dim scales
``fp8/tensor``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..checkpoint.index import CONFIG_NAME, CheckpointIndex
from ..errors import UnknownFormatError
from .base import StreamingFP8StateDictAdapter

_REGISTRY: dict[tuple[str | None, str], type[StreamingFP8StateDictAdapter]] = {}


def register_adapter(cls: type[StreamingFP8StateDictAdapter]) -> type[StreamingFP8StateDictAdapter]:
    """Class decorator: add ``cls`` under ``(cls.quant_method, cls.layout)``.  Re-registering a key
    replaces the old class with a warning (a user overriding a built-in on purpose)."""
    if not (isinstance(cls, type) and issubclass(cls, StreamingFP8StateDictAdapter)):
        raise TypeError(f"{cls!r} is not a StreamingFP8StateDictAdapter subclass")
    if not cls.layout:
        raise TypeError(f"{cls.__name__} must set a non-empty `layout`")
    key = (cls.quant_method, cls.layout)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        warnings.warn(
            f"adapter {key} re-registered: {_REGISTRY[key].__name__} -> {cls.__name__}", stacklevel=2
        )
    _REGISTRY[key] = cls
    return cls


def unregister_adapter(quant_method: str | None, layout: str) -> None:
    _REGISTRY.pop((quant_method, layout), None)


def list_adapters() -> list[dict[str, Any]]:
    """Registered adapters, one dict each: ``quant_method``, ``layout``, ``class``, ``description``."""
    return [
        {"quant_method": m, "layout": lay, "class": c.__name__, "description": c.description}
        for (m, lay), c in sorted(_REGISTRY.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
    ]


def get_adapter(
    checkpoint_path_or_config: str | os.PathLike | Mapping[str, Any],
    *,
    index: CheckpointIndex | None = None,
) -> StreamingFP8StateDictAdapter:
    """The adapter for a checkpoint folder (bound to its headers) or for a config dict (``config.json``
    contents or just its ``quantization_config``; unbound, layout chosen from the config alone)."""
    if isinstance(checkpoint_path_or_config, Mapping):
        cfg = dict(checkpoint_path_or_config)
        qc = cfg.get("quantization_config", cfg if "quant_method" in cfg else None)
        source = "config"
    else:
        path = Path(checkpoint_path_or_config)
        if index is None:
            index = CheckpointIndex.open(path)
        qc = index.quantization_config
        source = str(path / CONFIG_NAME)
    method = None if qc is None else qc.get("quant_method")
    if qc is not None and method is None:
        raise UnknownFormatError(
            "quantization_config has no quant_method",
            file=source, expected=f"quant_method in {_methods()}",
            fix="add quant_method to quantization_config, or remove quantization_config for a BF16 checkpoint",
        )
    candidates = [c for (m, _), c in _REGISTRY.items() if m == method]
    if not candidates:
        raise UnknownFormatError(
            f"quant_method {method!r} is not an FP8 or NVFP4 format this package reads (AWQ, GPTQ, MXFP4, "
            "bitsandbytes... are other formats)",
            file=source, expected=f"one of the supported formats: {_supported()}",
            fix="load this checkpoint with its own library, or register an adapter for it with "
            "@streaming_adapters.register_adapter (docs/adapters.md)",
        )
    chosen = [c for c in candidates if c.detect(qc, index)]
    if len(chosen) != 1:
        layouts = [c.layout for c in candidates]
        scheme = {k: qc[k] for k in ("format", "quant_algo") if k in qc}
        verdict = "it is not one of the FP8 / NVFP4 schemes this package reads" if not chosen else "ambiguous"
        raise UnknownFormatError(
            f"{'no' if not chosen else 'more than one'} {method!r} adapter accepts this checkpoint ({scheme}; "
            f"tried {layouts}, accepted {[c.layout for c in chosen]}): {verdict}",
            file=source, expected=f"one of the supported formats: {_supported()}",
            fix="check quantization_config against the stored scales, or register an adapter for this layout",
        )
    adapter = chosen[0](qc, index)
    return adapter


def _supported() -> str:
    """``quant_method/layout (description)`` of every registered adapter, for error messages."""
    return "; ".join(f"{m or 'none'}/{lay} ({c.description})" for (m, lay), c in
                     sorted(_REGISTRY.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])))


def _methods() -> list[str]:
    return sorted({json.dumps(m) if m is None else m for (m, _) in _REGISTRY})
