"""``quant_method: compressed-tensors`` FP8 (llm-compressor ``float-quantized`` W8A8 / ``naive-quantized``
W8A16): ``X.weight_scale`` in the model dtype with the shape of its strategy:

    tensor  [1]            block (N, K)
    channel [N, 1]         block (1, K)
    group   [N, ceil(K/g)] block (1, g)
    block   [ceil(N/bh), ceil(K/bw)]   block (bh, bw) = weights.block_structure

Which config group applies to a module follows compressed-tensors: a target that names the module
(exact or ``re:`` regex) wins over a class target such as ``Linear``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import StreamingFP8StateDictAdapter, compile_patterns, matches_any
from .registry import register_adapter
from ..errors import ScaleLayoutError, UnknownFormatError

FP8_FORMATS = ("float-quantized", "naive-quantized")


def _groups(qc: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``config_groups`` as (name, group) pairs; a hand-edited config of the wrong JSON types is a named error
    (not an AttributeError deep inside detect())."""
    groups = qc.get("config_groups") or {}
    bad = None
    if not isinstance(groups, Mapping):
        bad = f"config_groups is a JSON {type(groups).__name__}"
    else:
        for name, g in groups.items():
            if not isinstance(g, Mapping):
                bad = f"config_groups[{name!r}] is a JSON {type(g).__name__}"
            elif not (isinstance(g.get("targets", []), list)
                      and all(isinstance(t, str) for t in g.get("targets", []))):
                bad = f"config_groups[{name!r}].targets is not a list of strings"
            elif g.get("weights") is not None and not isinstance(g["weights"], Mapping):
                bad = f"config_groups[{name!r}].weights is a JSON {type(g['weights']).__name__}"
            if bad:
                break
    if bad:
        raise ScaleLayoutError(
            bad, file="config.json", tensor="quantization_config.config_groups",
            expected='{"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, ...}}}',
            fix="repair quantization_config in config.json (it is not what llm-compressor writes)",
        )
    return sorted(groups.items())


@register_adapter
class CompressedTensorsFP8Adapter(StreamingFP8StateDictAdapter):
    quant_method = "compressed-tensors"
    layout = "float"
    description = "compressed-tensors FP8 (float-quantized / naive-quantized): tensor, channel, group, block"
    scale_suffixes = ("weight_scale",)
    hidden_suffixes = ("input_scale", "output_scale", "k_scale", "v_scale", "weight_zero_point", "input_zero_point")

    @classmethod
    def detect(cls, quant_config, index) -> bool:
        qc = quant_config or {}
        formats = {str(qc.get("format"))} | {str(g.get("format")) for _, g in _groups(qc)}
        return bool(formats & set(FP8_FORMATS))

    def _scheme_for(self, module: str) -> dict:
        groups = _groups(self.quant_config)
        named = [g for _, g in groups if matches_any(module, compile_patterns(
            t for t in g.get("targets", []) if t.startswith("re:") or "." in t))]
        by_class = [g for _, g in groups if g not in named]
        chosen = (named or by_class or [None])[0]
        if chosen is None or not chosen.get("weights"):
            raise UnknownFormatError(
                "no compressed-tensors config group quantizes the weights of this module",
                file="config.json", tensor=module,
                expected="a config_groups entry with `weights` whose targets match the module",
                fix="check quantization_config.config_groups",
            )
        return chosen["weights"]

    def scale_block(self, weight, scale):
        module = weight.name.rsplit(".", 1)[0]
        w = self._scheme_for(module)
        if w.get("type", "float") != "float" or w.get("num_bits", 8) != 8:
            raise UnknownFormatError(
                f"compressed-tensors scheme type={w.get('type')} num_bits={w.get('num_bits')} is not FP8",
                file="config.json", tensor=weight.name, expected="weights.type 'float', num_bits 8",
                fix="this adapter reads FP8 only; register an adapter for this scheme",
            )
        if not w.get("symmetric", True):
            raise UnknownFormatError(
                "asymmetric FP8 (zero points) is not a format any producer writes",
                file="config.json", tensor=weight.name, expected="symmetric: true",
                fix="re-export the checkpoint symmetric",
            )
        n_lead = len(weight.shape) - 2
        k = weight.shape[-1]
        strategy = w.get("strategy", "tensor")
        if strategy == "tensor":
            return tuple(weight.shape)
        if strategy == "channel":
            return (1,) * n_lead + (1, k)
        if strategy == "group":
            g = w.get("group_size")
            if type(g) is not int or g <= 0:  # not bool, not 128.0
                raise ScaleLayoutError(
                    f"group strategy with group_size {g!r}", file="config.json", tensor=weight.name,
                    expected="a positive group_size", fix="fix quantization_config",
                )
            return (1,) * n_lead + (1, g)
        if strategy == "block":
            bs = w.get("block_structure")
            if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(type(b) is int and b > 0 for b in bs)):
                raise ScaleLayoutError(
                    f"block strategy with block_structure {bs!r}", file="config.json", tensor=weight.name,
                    expected="[block_rows, block_cols], two positive integers", fix="fix quantization_config",
                )
            return (1,) * n_lead + (bs[0], bs[1])
        raise UnknownFormatError(
            f"compressed-tensors strategy {strategy!r} is not an FP8 weight strategy",
            file="config.json", tensor=weight.name, expected="tensor, channel, group or block",
            fix="register an adapter for this strategy",
        )
