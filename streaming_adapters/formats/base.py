"""The scale-format protocol: what an FP8 checkpoint's tensors mean, independent of the model family.

An adapter turns a checkpoint's headers into :class:`LogicalTensor` entries, the tensors a user loads:

* FP8 weights appear with a floating dtype (BF16 by default) and carry a :class:`ScaleGrid`;
* their scales and activation / KV scales are *hidden* (kept out of the planner's metadata, but loadable
  by name on request);
* everything else is a plain tensor.

Every FP8 scale layout in the wild is one case of a block grid with ceil division (formats.md §1.1):
per-tensor = one block of the whole tensor, per-channel = blocks ``(1, K)``, group = ``(1, g)``,
block = ``(bm, bn)``.  So an adapter only says *which* tensor is the scale, which block size it has and
how its values are encoded; the numerics (``numerics/fp8.py``) handle all layouts with one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

import torch

from ..checkpoint.index import CheckpointIndex, TensorInfo
from .ignore import ModulePatterns, compile_patterns as _compile
from ..errors import MissingScaleError, ScaleLayoutError, UnknownFormatError

if TYPE_CHECKING:
    from .decoder import BoxDecoder

# How stored scale values become fp32 multipliers.
#   float:       F32 / BF16 / F16 values, used as they are
#   e8m0:        F8_E8M0 (torch.float8_e8m0fnu): 2**(b-127), 0xFF = NaN
#   u8_exponent: U8 bytes holding the same exponent as e8m0 (DeepSeek-V3.2 `scale_fmt: ue8m0` exports)
SCALE_ENCODINGS = ("float", "e8m0", "u8_exponent")


@dataclass(frozen=True)
class ScaleGrid:
    """A weight's scale: a grid of ``ceil(shape / block)`` multipliers, block ``(i, j)`` covering
    rows ``[i*bm, min((i+1)*bm, N))`` and columns ``[j*bn, min((j+1)*bn, K))`` in global coordinates."""

    tensor: TensorInfo
    block: tuple[int, ...]
    encoding: str = "float"

    @property
    def grid(self) -> tuple[int, ...]:
        return self.tensor.shape


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor as the planner sees it: name, global shape, dtype, where its bytes are, and its scale."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored: TensorInfo
    scale: ScaleGrid | None = None
    #: Layouts that are not one FP8 code per element times ``scale`` (NVFP4: two codes per byte and a
    #: global scale) carry the object that reads and decodes their boxes (formats/decoder.py); the box
    #: executors call it instead of the FP8 path.  ``stored`` is then in the decoder's own coordinates.
    decoder: "BoxDecoder | None" = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


def grid_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-s // b) for s, b in zip(shape, block))  # integer ceil: exact for any size


def prove_block_sizes(pairs: Iterable[tuple[TensorInfo, tuple[int, ...], tuple[int, ...]]], config: str) -> None:
    """Refuse a block size that the stored scale grids do not pin down (issue 13: a 128-block checkpoint
    declared [129, 129] or [112, 128] has the same ceil grids for its 320x200 weights and would load wrong).

    Per weight dim (counted from the last) and declared block ``b``, the sizes ``b'`` with
    ``ceil(d / b') == g`` for every (dim ``d``, grid ``g``) pair form an interval ``[lo, hi]``:
    ``lo = max ceil(d / g)``, ``hi = min floor((d - 1) / (g - 1))`` over pairs with ``g >= 2`` (pairs with
    ``g == 1`` are one block whatever ``b'``: any size gives the same values there).  ``b`` is proven when

    * the interval is ``{b}`` (some dim's grid is unique to ``b``), or
    * some dim is an exact multiple, ``d == g * b`` (7168 = 56 x 128: then ``b == lo``; the producer's
      block), or
    * ``b`` is the only power of two in the interval: every producer (DeepSeek, Qwen, llm-compressor,
      ModelOpt) uses power-of-two blocks, and a non-power-of-two declaration must be proven by the data.

    Otherwise another ``b'`` in the interval gives the same grids but different values: refuse.
    """
    axes: dict[tuple[int, int], list[int]] = {}  # (dim from the end, b) -> [lo, hi, exact]
    where: dict[tuple[int, int], str] = {}
    for info, block, grid in pairs:
        nd = len(info.shape)
        for i, (d, b, g) in enumerate(zip(info.shape, block, grid)):
            if g < 2:
                continue
            key = (i - nd, b)
            st = axes.setdefault(key, [1, 1 << 63, 0])
            st[0] = max(st[0], -(-d // g))
            st[1] = min(st[1], (d - 1) // (g - 1))
            st[2] |= d == g * b
            where.setdefault(key, info.name)
    for (axis, b), (lo, hi, exact) in sorted(axes.items()):
        pow2 = [1 << k for k in range(max(lo, 1).bit_length() - 1, hi.bit_length() + 1) if lo <= 1 << k <= hi]
        if lo == hi or exact or pow2 == [b]:
            continue
        raise ScaleLayoutError(
            f"block size {b} (weight dim {axis}) is not proven by the stored scales: every block size in "
            f"{lo}..{hi} gives the same scale grids for all weights, but they dequantize to different values",
            file=config, tensor=where[(axis, b)],
            expected=f"a block size pinned by the tensors: a weight dim that is an exact multiple of {b}, a "
            f"grid only {b} gives, or {b} the only power of two in {lo}..{hi}",
            fix="check the block size in quantization_config (weight_block_size / block_structure / group_size) "
            "against the exporter's (DeepSeek, Qwen, llm-compressor: 128); a wrong one would load wrong values",
        )


class StreamingFP8StateDictAdapter:
    """Base class of the scale-format adapters.  Subclass, set the class attributes, implement
    :meth:`scale_block`, and decorate with :func:`~streaming_adapters.formats.register_adapter`.

    Class attributes:
        quant_method: the ``quantization_config.quant_method`` this adapter reads (``None``: no config).
        layout: the scale layout it reads, a short name that tells adapters of one method apart.
        scale_suffixes: names of a weight's scale, relative to its module (``X.weight`` -> ``X.<suffix>``).
        hidden_suffixes: other per-module keys kept out of the planner (activation / KV scales).
        description: one line for ``list_adapters()``.
        fused_scale_suffixes / fused_hidden_suffixes: the same for a parameter without a ``.weight`` leaf,
            appended to its name (transformers 5 fused experts: ``mlp.experts.gate_up_proj`` [E, 2I, H] ->
            ``mlp.experts.gate_up_proj_scale_inv``, ``..._activation_scale``).
    """

    quant_method: ClassVar[str | None] = None
    layout: ClassVar[str] = ""
    scale_suffixes: ClassVar[tuple[str, ...]] = ("weight_scale_inv",)
    hidden_suffixes: ClassVar[tuple[str, ...]] = ()
    fused_scale_suffixes: ClassVar[tuple[str, ...]] = ()
    fused_hidden_suffixes: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: dtype of dequantized weights in the planner's metadata.  Destinations may be BF16, FP16 or FP32.
    output_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __init__(self, quant_config: Mapping[str, Any] | None, index: CheckpointIndex | None = None):
        self.quant_config: dict[str, Any] = dict(quant_config or {})
        self.index = index

    # -- what subclasses implement --------------------------------------------------------------
    @classmethod
    def detect(cls, quant_config: Mapping[str, Any] | None, index: CheckpointIndex | None) -> bool:
        """True if this adapter reads this checkpoint.  Called only for adapters registered under the
        checkpoint's ``quant_method``; ``index`` is None when only a config is known."""
        return True

    def scale_block(self, weight: TensorInfo, scale: TensorInfo) -> tuple[int, ...]:
        """The block size of ``scale`` over ``weight`` (one entry per weight dim).  Raise
        :class:`~streaming_adapters.errors.ScaleLayoutError` when the pair is not of this format."""
        raise NotImplementedError(f"{type(self).__name__} must implement scale_block()")

    def scale_encoding(self, weight: TensorInfo, scale: TensorInfo) -> str:
        if scale.dtype == "F8_E8M0":
            return "e8m0"
        if scale.dtype in ("F32", "BF16", "F16"):
            return "float"
        raise ScaleLayoutError(
            f"scale dtype {scale.dtype} is not a scale encoding of {self.name}",
            file=scale.file, tensor=scale.name, expected="F32, BF16, F16 or F8_E8M0",
            fix="check the checkpoint's quantization_config; register an adapter for this encoding",
        )

    # -- generic planning -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.quant_method or 'unquantized'}/{self.layout}"

    def bind(self, index: CheckpointIndex) -> "StreamingFP8StateDictAdapter":
        self.index = index
        self.__dict__.pop("plan", None)
        return self

    def scale_name(self, weight_name: str) -> str | None:
        """The scale tensor of ``weight_name`` present in the checkpoint, if any."""
        if not weight_name.endswith(".weight"):
            return next((weight_name + s for s in self.fused_scale_suffixes if weight_name + s in self._index), None)
        module = weight_name[: -len(".weight")]
        for suffix in self.scale_suffixes:
            if f"{module}.{suffix}" in self._index:
                return f"{module}.{suffix}"
        return None

    def is_hidden(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in self.scale_suffixes or leaf in self.hidden_suffixes:
            return True
        # A fused parameter's scale: hidden only beside the parameter it scales (names are free-form).
        return self.index is not None and any(
            name.endswith(s) and name[: -len(s)] in self.index
            for s in self.fused_scale_suffixes + self.fused_hidden_suffixes
        )

    @property
    def _index(self) -> CheckpointIndex:
        if self.index is None:
            raise RuntimeError(f"adapter {self.name} is not bound to a checkpoint: call .bind(index)")
        return self.index

    @cached_property
    def plan(self) -> "AdapterPlan":
        """Logical tensors and hidden tensors of the bound checkpoint, validated pair by pair."""
        logical: dict[str, LogicalTensor] = {}
        hidden: dict[str, TensorInfo] = {}
        used_scales: set[str] = set()
        pairs: list[tuple[TensorInfo, tuple[int, ...], tuple[int, ...]]] = []
        for name, info in self._index.tensors.items():
            if self.is_hidden(name):
                hidden[name] = info
                continue
            scale_name = self.scale_name(name)
            if info.is_fp8:
                if scale_name is None and self.quant_method is None:
                    self._fp8_without_config(name, info)
                if scale_name is None:
                    raise MissingScaleError(
                        "FP8 weight without a scale: its codes cannot be dequantized",
                        file=str(self._index.file_path(info.file)), tensor=name,
                        expected=f"a scale named {self._expected_scale_names(name)}",
                        fix="the checkpoint is incomplete or uses another scale name; register an adapter "
                        "with the right scale_suffixes (docs/adapters.md)",
                    )
                scale = self._index[scale_name]
                block = self._valid_block(info, self.scale_block(info, scale))
                grid_dims = self._check_grid(info, scale, block)
                pairs.append((info, block, grid_dims))
                # Same bytes, viewed with the grid's shape, so windows are read in weight coordinates.
                grid = ScaleGrid(replace(scale, shape=grid_dims), block, self.scale_encoding(info, scale))
                logical[name] = LogicalTensor(name, info.shape, self.output_dtype, info, grid)
                used_scales.add(scale_name)
            else:
                if scale_name is not None:
                    raise ScaleLayoutError(
                        f"a scale is stored for a {info.dtype} tensor, which is not FP8",
                        file=str(self._index.file_path(info.file)), tensor=name,
                        expected=f"{name} stored as F8_E4M3 because {scale_name} exists",
                        fix="the checkpoint mixes formats; re-export it, or drop the stray scale",
                    )
                logical[name] = LogicalTensor(name, info.shape, info.torch_dtype, info, None)
        prove_block_sizes(pairs, self._config_file)
        return AdapterPlan(logical, hidden)

    @property
    def _config_file(self) -> str:
        return str(self._index.path / "config.json") if self.index is not None else "config.json"

    def _valid_block(self, weight: TensorInfo, block: Any) -> tuple[int, ...]:
        """``block`` as positive ints, one per weight dim; anything else (0, a string, a float, a bool from a
        hand-edited config) is a named error here, not a ZeroDivisionError or TypeError later."""
        ok = isinstance(block, (tuple, list)) and len(block) == len(weight.shape) and all(
            type(b) is int and b > 0 for b in block)
        if not ok:
            raise ScaleLayoutError(
                f"block size {block!r} for a weight of shape {list(weight.shape)} is not one positive integer "
                "per dim", file=self._config_file, tensor=weight.name,
                expected=f"{len(weight.shape)} positive integers, e.g. [128, 128] (an empty weight has no block)",
                fix="fix the block size in quantization_config (weight_block_size / block_structure / "
                "group_size); an FP8 weight with a 0 dim cannot be quantized",
            )
        return tuple(block)

    def _fp8_without_config(self, name: str, info: TensorInfo) -> None:
        """FP8 tensors in a checkpoint that declares no quantization: the config is what is missing (a scale
        may well be there), so say that rather than "FP8 weight without a scale"."""
        cfg = self._index.path / "config.json"
        if not cfg.exists():
            raise UnknownFormatError(
                "the checkpoint stores FP8 tensors but has no config.json to say how they are quantized",
                file=str(cfg), tensor=name,
                expected="config.json with a quantization_config (quant_method, block size)",
                fix="copy the model's config.json into the checkpoint folder (it ships with every Hugging Face "
                "checkpoint)",
            )
        raise UnknownFormatError(
            "the checkpoint stores FP8 tensors but config.json has no quantization_config",
            file=str(cfg), tensor=name,
            expected="a quantization_config (quant_method, block size) in config.json or its text_config",
            fix="use the checkpoint's original config.json; an FP8 tensor is never loaded without its scale",
        )

    def _expected_scale_names(self, weight_name: str) -> str:
        if not weight_name.endswith(".weight"):
            return " or ".join(weight_name + s for s in self.fused_scale_suffixes) or "(none: this format "\
                "names scales after a `.weight` leaf)"
        module = weight_name[: -len(".weight")]
        return " or ".join(f"{module}.{s}" for s in self.scale_suffixes)

    def _check_grid(self, weight: TensorInfo, scale: TensorInfo, block: tuple[int, ...]) -> tuple[int, ...]:
        """Return the grid shape; accept the stored scale when it is the grid itself, the one-block grid
        stored as ``[]``/``[1]``, or the grid without its trailing 1s (channel ``[N]``, per-expert ``[E]``)."""
        want = grid_shape(weight.shape, block)
        got = scale.shape
        ok = (
            got == want
            or (math.prod(want) == 1 and math.prod(got) == 1)
            or (len(got) < len(want) and want[: len(got)] == got and all(d == 1 for d in want[len(got):]))
        )
        if not ok:
            raise ScaleLayoutError(
                f"scale grid {list(got)} does not match weight {list(weight.shape)} with block {list(block)}",
                file=str(self._index.file_path(scale.file)), tensor=scale.name,
                expected=f"grid {list(want)} = ceil({list(weight.shape)} / {list(block)})",
                fix="the config's block size (weight_block_size / strategy) does not match the stored "
                "scales; fix quantization_config or re-export the checkpoint",
            )
        return want


@dataclass(frozen=True)
class AdapterPlan:
    logical: dict[str, LogicalTensor]
    hidden: dict[str, TensorInfo]


def compile_patterns(items: Iterable[str]) -> ModulePatterns:
    """Config targets / ignore entries, compressed-tensors' syntax (exact names, ``re:`` regexes;
    formats/ignore.py).  A name matching the modules below it still works, with a DeprecationWarning."""
    return _compile(items, where="config.json (quantization_config)", legacy="prefix")


def matches_any(module: str, patterns: ModulePatterns) -> bool:
    return patterns.matches(module)
