"""Activation amax -> each format's input scale (formats.md §4), and the groups that must share one.

    compressed-tensors  X.input_global_scale  F32 [1]   generate_gparam(amax): the weight's global-scale
                                                       function (``nvfp4.ct_global_scale``), BF16 amax
    modelopt            X.input_scale         F32 []    fp32(amax) * fp32(1/2688) (a GPU export, as the
                                                       weights' ``weight_scale_2``); amax 0 or NaN -> 6/2688

Both come from the same BF16 amax; they are not exact reciprocals of each other.
"""

from __future__ import annotations

import math
import re

import torch

from ..formats.outputs import get_target

# Modules that read the same input tensor (formats.md §4): vLLM merges them and takes max() of their
# input scales, warning when they differ, so they are written equal.
INPUT_SHARING = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
                 ("w1", "w3"))
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")


def input_scale(fmt: str, amax: float) -> torch.Tensor:
    """The stored input scale of one Linear (fp32, the shape its format writes): the output target's."""
    return get_target(fmt).input_scale(amax)  # ValueError for a format that is not registered


def unify(amax: dict[str, float], *, experts: bool = False) -> dict[str, float]:
    """Max over each input-sharing group (``parent.q_proj`` / ``.k_proj`` / ``.v_proj`` ...); with
    ``experts`` also over all experts of one MoE layer with the same leaf (ModelOpt's
    ``layer_sync_moe_local_experts_amax``).  Returns a new table."""
    key_of: dict[str, tuple] = {}
    for name in amax:
        parent, _, leaf = name.rpartition(".")
        gkey: tuple = (parent, leaf)
        for gi, members in enumerate(INPUT_SHARING):
            if leaf in members:
                gkey = (parent, f"#group{gi}")
        if experts:
            m = _EXPERT.match(gkey[0] + "." + gkey[1])
            if m:
                gkey = (m.group(1), "*", m.group(3))
        key_of[name] = gkey
    best: dict[tuple, float] = {}
    for name, v in amax.items():
        k = key_of[name]
        best[k] = v if k not in best else _nanmax(best[k], v)
    return {name: best[key_of[name]] for name in amax}


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)
