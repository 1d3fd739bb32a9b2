"""The output-target seam: what a conversion writes for each output format, in one object per format.

    target = get_target("compressed-tensors")       # or "modelopt", "bf16"
    target.outputs_for(lt, quantize=True)           # the output tensors of one logical tensor
    gs = target.global_scale(amax)                  # the fused unit's global scale (BF16 amax)
    packed, scale = target.quantize(rows, gs)       # a block of BF16 rows -> NVFP4 codes + block scales
    target.decode(packed, scale, gs)                # the producer's decoder (verify)
    target.output_files(source_config, ignore)      # {"config.json": ..., "hf_quant_config.json": ...}

Conversion (``convert/engine.py``, ``convert/plan.py``) and verification (``convert/verify.py``) call these
methods and never branch on the format name; adding a format is one subclass and ``@register_target``.
The numerics stay in ``numerics/nvfp4.py`` (the group of 16 is ``nvfp4.GROUP``); a target only picks them.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from ...checkpoint.index import DTYPES

if TYPE_CHECKING:
    from ...checkpoint.index import CheckpointIndex, TensorInfo
    from ..base import LogicalTensor


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint and how it is produced from a logical source tensor.

    role: ``copy`` (stored bytes as they are), ``dequant`` (BF16 of an FP8 weight), ``packed`` /
    ``block_scale`` / ``global_scale`` (NVFP4 parts of a weight), ``input_scale`` (W4A4 activation scale).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    role: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * DTYPES[self.dtype][1] if self.shape else self.nbytes


def is_linear_weight(lt: "LogicalTensor") -> bool:
    """A 2-D ``*.weight`` that is not an embedding: what HF models hold in an nn.Linear."""
    return lt.name.endswith(".weight") and len(lt.shape) == 2 and "embed" not in lt.name


def without_quantization(config: Mapping[str, Any]) -> dict[str, Any]:
    """The source's config.json with its quantization_config removed (top level, or a VLM's text_config)."""
    cfg = copy.deepcopy(dict(config))
    holder = cfg["text_config"] if "quantization_config" not in cfg and isinstance(cfg.get("text_config"), dict) \
        and "quantization_config" in cfg["text_config"] else cfg
    holder.pop("quantization_config", None)
    return cfg


class OutputTarget(ABC):
    """One output format.  Subclass, set the class attributes, implement the abstract methods, decorate
    with :func:`register_target`.

    Class attributes:
        name: the format's name, the registry key (``"compressed-tensors"``, ``"modelopt"``, ``"bf16"``).
        target: the conversion target it belongs to (``"bf16"`` or ``"nvfp4"``): ``convert_checkpoint(target=,
            format=)`` picks a target by both.
        quantizes: ``True`` when eligible FP8 weights become quantized outputs (amax units, global scales,
            :meth:`quantize`); ``False``: every FP8 weight is written dequantized and the quantize methods are
            never called.
        description: one line for :func:`list_targets`.
    """

    name: ClassVar[str] = ""
    target: ClassVar[str] = ""
    quantizes: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @property
    def format(self) -> str | None:
        """The name a plan and a report record as ``format`` (``None`` for BF16, which has no format)."""
        return self.name if self.quantizes else None

    # -- which tensors --------------------------------------------------------------------------------
    def can_quantize(self, lt: "LogicalTensor") -> bool:
        """Whether this FP8 weight can be quantized by the format at all (shape); ignore lists come on top."""
        return False

    def outputs_for(self, lt: "LogicalTensor", quantize: bool, w4a4: bool = False) -> list[OutputTensor]:
        """The output tensors of one logical tensor.  ``quantize``: decided by the plan; ``w4a4``: give the
        quantized weight an activation scale (calibrated)."""
        if lt.scale is None:
            return [OutputTensor(lt.name, lt.stored.dtype, lt.shape, lt.name, "copy")]
        if not quantize:
            return [OutputTensor(lt.name, "BF16", lt.shape, lt.name, "dequant")]
        return self.quantized_outputs(lt, w4a4)

    def quantized_outputs(self, lt: "LogicalTensor", w4a4: bool) -> list[OutputTensor]:
        raise NotImplementedError(f"output format {self.name!r} writes no quantized tensors "
                                  f"(quantizes=False); {lt.name} must be planned as dequant")

    def quantized_parts(self, module: str, index: "CheckpointIndex") -> "tuple[TensorInfo, ...] | None":
        """(packed, block scale, global scale) of ``module`` in a written output, or ``None`` when the
        module was written unquantized (verify reads them)."""
        return None

    # -- numerics (quantizing formats) ------------------------------------------------------------------
    def global_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The stored global scale of a fused unit from its BF16 amax."""
        raise NotImplementedError(f"output format {self.name!r} has no global scale")

    def quantize(self, rows: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BF16 rows ``[r, K]`` -> (packed codes, block scales) with the unit's ``global_scale``."""
        raise NotImplementedError(f"output format {self.name!r} does not quantize")

    def decode(self, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """The format's consumer decode of written rows back to BF16 (verify)."""
        raise NotImplementedError(f"output format {self.name!r} does not quantize")

    def input_scale(self, amax: float) -> torch.Tensor:
        """W4A4: the stored activation scale of one Linear from its calibrated input amax."""
        raise NotImplementedError(f"output format {self.name!r} has no activation scales")

    # -- config ---------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, config: Mapping[str, Any]) -> bool:
        """Whether a written ``config.json`` is this format's output (verify picks the target by it)."""

    def is_w4a4(self, config: Mapping[str, Any]) -> bool:
        """Whether a written config declares calibrated activation scales."""
        return False

    @abstractmethod
    def output_files(self, source_config: Mapping[str, Any], ignore: list[str], w4a4: bool = False
                     ) -> dict[str, dict[str, Any]]:
        """The JSON files written beside the shards: ``config.json`` (the source's, quantization_config
        replaced) and any the format's consumers read besides (ModelOpt: ``hf_quant_config.json``)."""


_REGISTRY: dict[str, type[OutputTarget]] = {}


def register_target(cls: type[OutputTarget]) -> type[OutputTarget]:
    """Class decorator: add ``cls`` under ``cls.name``.  Re-registering a name replaces the old class with a
    warning (a user overriding a built-in on purpose)::

        @register_target
        class MyNVFP4(CompressedTensorsTarget):
            name = "my-nvfp4"
    """
    if not (isinstance(cls, type) and issubclass(cls, OutputTarget)):
        raise TypeError(f"{cls!r} is not an OutputTarget subclass")
    if not cls.name or cls.target not in ("bf16", "nvfp4"):
        raise TypeError(f"{cls.__name__} must set `name` and `target` ('bf16' or 'nvfp4')")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        warnings.warn(f"output target {cls.name!r} re-registered: {_REGISTRY[cls.name].__name__} -> "
                      f"{cls.__name__}", stacklevel=2)
    _REGISTRY[cls.name] = cls
    return cls


def unregister_target(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_targets() -> list[dict[str, str]]:
    """Registered output formats: ``name``, ``target``, ``class``, ``description``."""
    return [{"name": n, "target": c.target, "class": c.__name__, "description": c.description}
            for n, c in sorted(_REGISTRY.items())]


def get_target(name: str) -> OutputTarget:
    """The registered output format ``name`` (``"bf16"``, ``"compressed-tensors"``, ``"modelopt"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown output format {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


# The format a target takes when none is named: llm-compressor's, what vLLM loads without options.
DEFAULT_FORMAT = {"nvfp4": "compressed-tensors", "bf16": "bf16"}


def resolve_target(target: str, fmt: str | None) -> OutputTarget:
    """``convert_checkpoint(target=, format=)`` -> the output format object, with the messages the public
    API has always given (``format`` ``None`` / ``"hf"`` / ``"bf16"`` for BF16)."""
    targets = sorted({c.target for c in _REGISTRY.values()})
    if target not in targets:
        raise ValueError(f"target must be one of {tuple(targets)}, got {target!r}")
    formats = tuple(n for n, c in sorted(_REGISTRY.items()) if c.target == target)
    if target == "bf16":
        if fmt not in (None, "hf", "bf16"):
            raise ValueError(f"target bf16 takes no format (got {fmt!r})")
        return get_target(DEFAULT_FORMAT["bf16"])
    fmt = fmt or DEFAULT_FORMAT[target]
    if fmt not in formats:
        raise ValueError(f"format for {target} must be one of {formats}, got {fmt!r}")
    return get_target(fmt)


def target_of_config(config: Mapping[str, Any]) -> OutputTarget | None:
    """The registered format whose :meth:`~OutputTarget.detect` accepts a written config, or ``None``."""
    for name, cls in sorted(_REGISTRY.items()):
        if cls.detect(config):
            return cls()
    return None
