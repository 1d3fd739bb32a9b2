"""Key mappers: which checkpoint tensors fill which region of a model tensor.

A mapper answers, for one model key and its global shape, a list of :class:`Part`: "checkpoint tensor C
fills ``model[index][offset : offset + C.shape]``".  That covers every layout we meet:

    identity            model.layers.0.mlp.up_proj.weight <- the same name
    renamed             model.language_model.layers.0... <- language_model.model.layers.0... (old VLM layout)
    fused experts       mlp.experts.gate_up_proj [E, 2I, H] <- experts.{e}.gate_proj [I, H] at (e, 0, 0)
                                                            and experts.{e}.up_proj   [I, H] at (e, I, 0)
    stacked experts     mlp.experts.down_proj [E, H, I] <- experts.{e}.down_proj [H, I] at (e, 0, 0)
    tied                lm_head.weight <- model.embed_tokens.weight (checkpoint without lm_head)

The loader intersects each part's region with the rank's local shard and reads only that box of C into
a view of the shard's storage: fused parameters are filled in place, never assembled with ``torch.stack``.

Mappers are small and composable (``Chain``); families register theirs in ``families.py``.  The scale
format is not a mapper's business: the checkpoint side is always in *logical* (dequantized) terms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Part:
    """``ckpt_key`` fills ``model[index][offset[0]:offset[0]+c0, ...]`` (``c`` = its shape)."""

    ckpt_key: str
    index: tuple[int, ...] = ()
    offset: tuple[int, ...] = ()


class CheckpointView(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...


class KeyMapper:
    """Base: ``parts()`` returns the parts of ``key``, or None if this mapper does not handle it."""

    def parts(self, key: str, shape: tuple[int, ...], ckpt: CheckpointView) -> list[Part] | None:
        raise NotImplementedError

    def candidates(self, key: str) -> list[str]:
        """Checkpoint names a model name may have (used by mappers that build on renames)."""
        return [key]


def first_stored(names, ckpt) -> list[Part] | None:
    """The first of ``names`` the checkpoint holds, as one whole-tensor part; None if it holds none."""
    for n in names:
        if n in ckpt:
            return [Part(n)]
    return None


@dataclass
class Renames(KeyMapper):
    """Regex renames from model names to checkpoint names; the first candidate present wins.

    ``rules`` are ``(pattern, replacement)`` pairs tried in order; the unrenamed key is tried first.
    """

    rules: Sequence[tuple[str, str]] = ()
    _compiled: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [(re.compile(p), r) for p, r in self.rules]

    def candidates(self, key: str) -> list[str]:
        out = [key]
        for pat, rep in self._compiled:
            new = pat.sub(rep, key)
            if new != key and new not in out:
                out.append(new)
        return out

    def parts(self, key, shape, ckpt):
        return first_stored(self.candidates(key), ckpt)


@dataclass
class FusedExperts(KeyMapper):
    """transformers 5 fused experts from per-expert checkpoint tensors.

    ``gate_up`` ``[E, 2I, H]`` takes ``{gate}`` rows first, then ``{up}``; ``down`` ``[E, H, I]``.
    ``ckpt_module`` renames the experts' parent for the checkpoint (``mlp`` -> ``block_sparse_moe`` for
    Mixtral/MiniMax); ``renames`` maps model prefixes to checkpoint prefixes (VLM layouts).
    """

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    ckpt_module: tuple[str, str] | None = None  # (model parent leaf, checkpoint parent leaf)
    renames: Renames = field(default_factory=Renames)

    def _prefixes(self, model_prefix: str) -> list[str]:
        prefixes = []
        for p in self.renames.candidates(model_prefix):
            prefixes.append(p)
            if self.ckpt_module and p.endswith("." + self.ckpt_module[0]):
                prefixes.append(p[: -len(self.ckpt_module[0])] + self.ckpt_module[1])
        return prefixes

    def parts(self, key, shape, ckpt):
        m = re.match(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if m and len(shape) == 2:
            # One expert's nn.Linear (calibrate/moe.py linearizes the fused experts under these names): the
            # stored tensor of that expert, e.g. Mixtral's ``block_sparse_moe.experts.3.w1`` for gate_proj.
            model_prefix, e, proj = m.groups()
            stored = {"gate_proj": self.gate, "up_proj": self.up, "down_proj": self.down}[proj]
            return first_stored([f"{p}.experts.{e}.{stored}.weight" for p in self._prefixes(model_prefix)], ckpt)
        m = re.match(rf"(.*)\.experts\.({re.escape(self.fused_gate_up)}|{re.escape(self.fused_down)})$", key)
        if not m or len(shape) != 3:
            return None
        model_prefix, which = m.groups()
        n_experts = shape[0]
        for prefix in self._prefixes(model_prefix):
            def name(e: int, proj: str) -> str:
                return f"{prefix}.experts.{e}.{proj}.weight"

            if which == self.fused_gate_up and name(0, self.gate) in ckpt:
                inter = shape[1] // 2
                return [p for e in range(n_experts) for p in
                        (Part(name(e, self.gate), (e,), (0, 0)), Part(name(e, self.up), (e,), (inter, 0)))]
            if which == self.fused_down and name(0, self.down) in ckpt:
                return [Part(name(e, self.down), (e,), (0, 0)) for e in range(n_experts)]
        return None


@dataclass
class Tied(KeyMapper):
    """A checkpoint that ties ``target`` to ``source`` omits ``target``: read ``source`` for it."""

    target: str = "lm_head.weight"
    source: str = "model.embed_tokens.weight"
    renames: Renames = field(default_factory=Renames)

    def parts(self, key, shape, ckpt):
        if key != self.target or any(c in ckpt for c in self.renames.candidates(key)):
            return None
        return first_stored(self.renames.candidates(self.source), ckpt)


@dataclass
class Chain(KeyMapper):
    """The first mapper that handles a key wins; identity (with the chain's renames) last."""

    mappers: Sequence[KeyMapper] = ()
    renames: Renames = field(default_factory=Renames)

    def parts(self, key, shape, ckpt):
        for m in self.mappers:
            got = m.parts(key, shape, ckpt)
            if got is not None:
                return got
        return self.renames.parts(key, shape, ckpt)

    def candidates(self, key: str) -> list[str]:
        return self.renames.candidates(key)
