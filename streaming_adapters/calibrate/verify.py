"""W4A4 checks for ``verify_checkpoint``: every NVFP4 Linear has an input scale, finite and positive, and
the members of an input-sharing group (the family's fused groups: q/k/v, gate/up, q_a/kv_a, w1/w3 ...) carry
the same one (vLLM merges them and takes the max, warning when they differ)."""

from __future__ import annotations

import math

from ..formats.outputs import get_target
from ..models.families import Family
from .scales import input_group


def is_w4a4(config: dict, fmt: str | None) -> bool:
    """Whether a written config declares activation scales (the output target decides)."""
    return fmt is not None and get_target(fmt).is_w4a4(config)


def check_input_scales(modules: list[str], fmt: str, read, family: Family | None = None) -> tuple[int, list[str]]:
    """``modules``: the NVFP4 Linears; ``read(name) -> float | None`` reads a 1-element tensor of the
    output (None when absent); ``family``: the checkpoint's (its fused groups share an input).  Returns
    (scales checked, problems)."""
    problems: list[str] = []
    value: dict[str, float] = {}
    suffix = get_target(fmt).input_scale_suffix  # the output target names it (formats/outputs/nvfp4.py)
    for mod in modules:
        v = read(mod + suffix)
        if v is None:
            problems.append(f"{mod}: no {suffix[1:]}")
        elif not math.isfinite(v) or v <= 0:
            problems.append(f"{mod}: {suffix[1:]} = {v} (must be finite and > 0)")
        else:
            value[mod] = v
    groups: dict[str, dict[str, float]] = {}
    for mod, v in value.items():
        if (key := input_group(mod, family)) != mod:  # in a fused group
            groups.setdefault(key, {})[mod.rpartition(".")[2]] = v
    for key, vals in sorted(groups.items()):
        if len(set(vals.values())) > 1:
            parent = key.rpartition(".#")[0]
            problems.append(f"{parent} {sorted(vals)}: input scales differ {vals} (one input, one scale)")
    return len(value), problems
