"""FSDP2 for transformers models whose layers mix parameter dtypes.

FSDP2 (``fully_shard``) all-gathers one unit's parameters through one flat buffer, so a unit must hold a
single parameter dtype: ``FSDP expects uniform original parameter dtype but got {torch.bfloat16,
torch.float32}``.  transformers >= 5.2x keeps some parameters in F32 whatever ``dtype`` the model is built
with (``_keep_in_fp32_modules_strict``): DeepSeek-V3's router ``mlp.gate.weight`` [E, H] and its
``e_score_correction_bias``, for example.  The usual per-decoder-layer wrapping then fails on every MoE
layer of DeepSeek-V3 (58 of its 61 layers).

:func:`fully_shard_layers` is that per-layer wrapping with the one fix FSDP2 allows: a module whose own
parameters have another dtype than the unit it sits in becomes an FSDP unit of its own first (a router is
~0.1% of a layer's bytes, so its extra all-gather costs nothing measurable), keeping the F32 numerics the
model's authors asked for instead of casting them to BF16.  Loading is unchanged: a BF16 tensor on disk
fills an F32 parameter exactly (every BF16 value is an F32 value).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch import nn

from ..errors import DestinationError


def _direct_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters(recurse=False)]


def _managed_params(module: nn.Module, sharded: set[int]) -> Iterable[tuple[nn.Module, torch.Tensor]]:
    """(owner, parameter) for every parameter a unit rooted at ``module`` would manage: those not already
    inside an FSDP unit (``sharded`` holds the ids of modules already wrapped)."""
    stack = [module]
    while stack:
        m = stack.pop()
        for p in _direct_params(m):
            yield m, p
        stack.extend(c for c in m.children() if id(c) not in sharded)


def split_mixed_dtypes(module: nn.Module, sharded: set[int], shard) -> int:
    """Wrap, as units of their own, the submodules of ``module`` whose parameters differ in dtype from the
    unit's majority dtype (by bytes).  Returns how many units were made.  ``shard(m)`` wraps one module."""
    owners = list(_managed_params(module, sharded))
    by_bytes: Counter = Counter()
    for _, p in owners:
        by_bytes[p.dtype] += p.numel() * p.element_size()
    if len(by_bytes) <= 1:
        return 0
    major = by_bytes.most_common(1)[0][0]
    made = 0
    for owner in {id(o): o for o, p in owners if p.dtype != major}.values():
        dtypes = {p.dtype for p in _direct_params(owner)}
        if len(dtypes) > 1 or owner is module:
            names = sorted(n for n, p in owner.named_parameters(recurse=False))
            raise DestinationError(
                f"{type(owner).__name__} holds parameters of several dtypes ({sorted(map(str, dtypes))}) in one "
                "module; FSDP2 needs one dtype per unit",
                tensor=", ".join(names[:4]),
                expected="one parameter dtype per module",
                fix="cast that module's parameters to one dtype before fully_shard, or keep it replicated",
            )
        shard(owner)
        sharded.add(id(owner))
        made += 1
    return made


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The items of the outermost ``nn.ModuleList``s (decoder layers, a VLM's vision layers), not lists
    nested inside them (unfused experts): FSDP2 units must be wrapped inner before outer."""
    out: list[nn.Module] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(p + ".") for p in inside):
            continue
        for i, item in enumerate(m):
            if any(True for _ in item.parameters()):
                out.append(item)
                inside.append(f"{name}.{i}" if name else str(i))
    return out


def fully_shard_layers(model: nn.Module, mesh=None, *, layers: Iterable[nn.Module] | None = None,
                       **fsdp_kwargs) -> nn.Module:
    """FSDP2 the usual way (each decoder layer, then the root), with mixed-dtype submodules (F32 routers)
    made units of their own first.  ``layers`` defaults to every ``nn.ModuleList``'s items under the model
    (decoder layers, a VLM's vision layers); ``fsdp_kwargs`` go to ``fully_shard`` (``mp_policy``,
    ``reshard_after_forward``, ...).  Returns the model (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import fully_shard

    sharded: set[int] = set()

    def shard(m: nn.Module) -> None:
        fully_shard(m, mesh=mesh, **fsdp_kwargs)

    if layers is None:
        layers = decoder_layers(model)
    for layer in layers:
        if id(layer) in sharded:
            continue
        split_mixed_dtypes(layer, sharded, shard)
        shard(layer)
        sharded.add(id(layer))
    split_mixed_dtypes(model, sharded, shard)
    shard(model)
    return model
