"""Activation amax -> each format's input scale (formats.md §4), and the groups that must share one.

    compressed-tensors  X.input_global_scale  F32 [1]   generate_gparam(amax): the weight's global-scale
                                                       function (``nvfp4.ct_global_scale``), BF16 amax
    modelopt            X.input_scale         F32 []    fp32(amax) * fp32(1/2688) (a GPU export, as the
                                                       weights' ``weight_scale_2``); amax 0 or NaN -> 6/2688

Both come from the same BF16 amax; they are not exact reciprocals of each other.

Which modules share one input is the checkpoint's family's data (``models/families.py``: its fused groups,
q/k/v, gate/up, q_a/kv_a, experts' w1/w3 ..., and its expert layout), so a registered family needs nothing here.
"""

from __future__ import annotations

import math

import torch

from ..formats.outputs import get_target
from ..models.families import LEAF_GROUPS, Family, get_family

# Deprecated: the bare leaf names input sharing was once matched by; the groups are the family's fused groups
# (``Family.fused_module``).
INPUT_SHARING = LEAF_GROUPS


def input_scale(fmt: str, amax: float) -> torch.Tensor:
    """The stored input scale of one Linear (fp32, the shape its format writes): the output target's."""
    return get_target(fmt).input_scale(amax)  # ValueError for a format that is not registered


def input_group(module: str, family: Family | None = None, *, experts: bool = False) -> str:
    """The key ``module``'s input scale is shared under: its fused group's (``parent.#<group>``: modules that
    read the same input tensor, formats.md §4: vLLM merges them and takes max() of their input scales,
    warning when they differ, so they are written equal), or the module itself; with ``experts`` the expert
    index replaced by ``*`` (one scale for all experts of a MoE layer).  ``family``: the checkpoint's
    (default: every group this project knows)."""
    fam = family if family is not None else get_family()
    group = fam.fused_module(module)
    key = f"{group[0]}.#{group[1]}" if group is not None else module
    return (fam.any_expert(key) or key) if experts else key


def unify(amax: dict[str, float], *, experts: bool = False, family: Family | None = None) -> dict[str, float]:
    """Max over each input-sharing group of the family (``parent.q_proj`` / ``.k_proj`` / ``.v_proj`` ...);
    with ``experts`` also over all experts of one MoE layer with the same leaf (ModelOpt's
    ``layer_sync_moe_local_experts_amax``).  Returns a new table."""
    key_of = {name: input_group(name, family, experts=experts) for name in amax}
    best: dict[str, float] = {}
    for name, v in amax.items():
        k = key_of[name]
        best[k] = v if k not in best else _nanmax(best[k], v)
    return {name: best[key_of[name]] for name in amax}


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)
