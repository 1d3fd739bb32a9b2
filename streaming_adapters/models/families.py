"""Model families: per ``model_type`` the data the loader and the conversion need about a model's names.

A :class:`Family` holds the key mapper (model names -> checkpoint regions, ``keymap.py``), the fused groups
(modules that read one input: their NVFP4 weights share one global scale and, W4A4, their input scales are
one), how decoder layers appear in names (``layer_of``), where expert indices are (``expert_of``) and which
model tensors stack experts along dim 0 (``stacks_experts``).  One registry, keyed on ``config.json``'s
``model_type``, like vLLM's ``packed_modules_mapping`` kept per model.  Every stage asks the checkpoint's
family: coverage (layers), load planning (layers, stacked experts), conversion (fused groups, layer order),
calibration (shared input scales, experts of a layer), layouts (pipeline stages, expert owners).

Add or override a family in a few lines (docs/models.md runs this)::

    @register_key_mapper("my_moe", fused=MOE_FUSED + (("mlp.experts.*.w1", "mlp.experts.*.w3"),))
    def my_moe() -> KeyMapper:
        return Chain([FusedExperts(gate="w1", up="w3", down="w2")], renames=Renames([(r"^model\\.", "")]))
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .keymap import Chain, FusedExperts, KeyMapper, Renames, Tied

# A decoder layer: ``model.layers.3.``, ``model.language_model.layers.0.``, ``vision_tower.transformer.layers.1.``,
# ``layers.3.`` (torchtitan; pipeline stages keep global indices).  The prefix tells vision layer 0 from
# language layer 0.
LAYERS = r"^((?:.*?\.)?layers)\.(\d+)\."
# Per-expert tensors: ``mlp.experts.3.gate_proj.weight``, ``block_sparse_moe.experts.3.w1.weight``.
EXPERTS = r"\.experts\.(\d+)\."
# Model tensors that stack every expert along dim 0 (transformers 5's ``mlp.experts.gate_up_proj`` [E, 2I, H]):
# a rank holding experts ``first ..`` as plain tensors sits at that row.  Per-expert names do not match.
STACKED_EXPERTS = r"\.experts\.[A-Za-z_]\w*$"

# Fused groups, as module paths relative to a decoder layer (``*`` = one name component, e.g. an expert index).
# Members of a group are siblings (one parent module): they read the same input.
ATTENTION_QKV = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)
DENSE_FUSED = ATTENTION_QKV + (("mlp.gate_proj", "mlp.up_proj"),)
MOE_FUSED = DENSE_FUSED + (
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
    ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),    # Qwen2-MoE
    ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),  # DeepSeek-V3, GLM-4-MoE
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),          # MLA: both read the layer's input
)
MIXTRAL_FUSED = ATTENTION_QKV + (("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"),)
# Pixtral's vision tower names its attention and MLP differently from the text model.
VLM_FUSED = DENSE_FUSED + (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                           ("feed_forward.gate_proj", "feed_forward.up_proj"))

# Deprecated: the bare leaf names fused groups were once matched by, anywhere in a name (kept as
# ``convert.plan.FUSED_MEMBERS`` and ``calibrate.scales.INPUT_SHARING``); the groups above replace them.
LEAF_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
               ("w1", "w3"))


def _pattern(rel: str) -> str:
    return r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in rel.split("."))


@dataclass(frozen=True)
class Family:
    """What the project knows about one model family's names.

    ``key_mapper``: a factory of the family's :class:`~.keymap.KeyMapper`.  ``fused``: groups of module paths
    relative to a decoder layer that read one input, so their NVFP4 weights share one global scale
    (formats.md §2.3) and their W4A4 input scales are written equal (§4).  ``layers``: a regex whose groups 1
    and 2 are a decoder layer's prefix and index (checkpoint and model names).  ``experts``: a regex whose
    group 1 is the expert index of a per-expert checkpoint tensor.  ``stacked_experts``: a regex matching the
    model tensors whose dim 0 is the expert."""

    name: str
    key_mapper: Callable[[], KeyMapper]
    fused: tuple[tuple[str, ...], ...] = DENSE_FUSED
    layers: str = LAYERS
    experts: str = EXPERTS
    stacked_experts: str = STACKED_EXPERTS
    _compiled: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for group in self.fused:
            parents = {m.rpartition(".")[0] for m in group}
            if isinstance(group, str) or len(parents) != 1:
                raise ValueError(f"family {self.name!r}: fused group {group!r} must be a tuple of sibling module "
                                 "paths (one parent module, e.g. ('self_attn.q_proj', 'self_attn.k_proj'))")
        fused = [(re.compile(_pattern(m) + "$"), gi) for gi, group in enumerate(self.fused) for m in group]
        object.__setattr__(self, "_compiled", (re.compile(self.layers), re.compile(self.experts), fused,
                                               re.compile(self.stacked_experts)))

    def mapper(self) -> KeyMapper:
        return self.key_mapper()

    def layer_of(self, name: str) -> tuple[str, int] | None:
        """``(prefix, index)`` of the decoder layer ``name`` belongs to, or None (embeddings, norm, lm_head)."""
        m = self._compiled[0].match(name)
        return (m.group(1), int(m.group(2))) if m else None

    def expert_of(self, name: str) -> int | None:
        """The expert index of a per-expert tensor, or None."""
        m = self._compiled[1].search(name)
        return int(m.group(1)) if m else None

    def any_expert(self, name: str) -> str | None:
        """``name`` with its expert index replaced by ``*``: the name every expert of that MoE layer shares
        (ModelOpt syncs the experts' input amax over it), or None for a name of no expert."""
        m = self._compiled[1].search(name)
        return name[: m.start(1)] + "*" + name[m.end(1):] if m else None

    def stacks_experts(self, key: str) -> bool:
        """Whether model tensor ``key`` holds every expert along dim 0 (``...experts.gate_up_proj``)."""
        return self._compiled[3].search(key) is not None

    def fused_module(self, module: str) -> tuple[str, int] | None:
        """``(parent module, group index)`` of a module (``model.layers.0.self_attn.q_proj``) in a fused group,
        or None: the modules that read one input."""
        layer = self._compiled[0].match(module)
        if layer is None:
            return None
        rel = module[layer.end():]
        for pat, gi in self._compiled[2]:
            if pat.match(rel):
                return module.rpartition(".")[0], gi
        return None

    def fused_group(self, name: str) -> tuple[str, int] | None:
        """``(parent module, group index)`` of a weight (``....weight``) in a fused group, or None."""
        return self.fused_module(name[: -len(".weight")]) if name.endswith(".weight") else None


_FAMILIES: dict[str, Family] = {}

# Multimodal Mistral checkpoints exist in two layouts: transformers 5 / new exports
# (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.weight``) and transformers 4 saves
# (``language_model.model.*``, ``vision_tower.*``, ``language_model.lm_head.weight``).  Text-only models
# (``model.layers.*``) can also be filled from either VLM layout.
VLM_RENAMES = Renames([
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^lm_head\.", "language_model.lm_head."),
])
TEXT_FROM_VLM = Renames([
    (r"^model\.", "model.language_model."),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
])


def register_family(family: Family, *model_types: str) -> Family:
    """Register ``family`` for ``model_types`` (default: its name); a re-registration warns and wins."""
    for mt in model_types or (family.name,):
        old = _FAMILIES.get(mt)
        if old is not None and old != family:
            warnings.warn(f"model family for {mt!r} re-registered", stacklevel=3)
        _FAMILIES[mt] = family
    return family


def register_key_mapper(*model_types: str, fused: tuple[tuple[str, ...], ...] = DENSE_FUSED, layers: str = LAYERS,
                        experts: str = EXPERTS, stacked_experts: str = STACKED_EXPERTS):
    """Decorator: register a key-mapper factory (and the family's data) for ``model_types``."""
    def deco(factory: Callable[[], KeyMapper]):
        family = Family(model_types[0], factory, tuple(tuple(g) for g in fused), layers, experts, stacked_experts)
        for mt in model_types:
            register_family(family, mt)
        return factory

    return deco


def list_key_mappers() -> list[str]:
    return sorted(_FAMILIES)


def get_family(config: Mapping[str, Any] | Any | None = None) -> Family:
    """The family of a config's ``model_type`` (dict or transformers config); ``__default__`` otherwise."""
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return _FAMILIES.get(mt or "", _FAMILIES["__default__"])


def get_key_mapper(config: Mapping[str, Any] | Any) -> KeyMapper:
    """The mapper of a config's ``model_type`` (dict or transformers config); identity + tied otherwise."""
    return get_family(config).mapper()


@register_key_mapper("llama", "mistral", "qwen2", "qwen3", "ministral", "ministral3")
def dense() -> KeyMapper:
    return Chain([Tied(renames=TEXT_FROM_VLM)], renames=TEXT_FROM_VLM)


# An unknown model_type: the dense mapper with every fused group this project knows (a name only matches
# the groups of its own layout, so the union is what each family would say).
register_family(Family("__default__", dense, MOE_FUSED + MIXTRAL_FUSED[1:] + VLM_FUSED[2:]))


@register_key_mapper("qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "glm4_moe", "kimi_k2", fused=MOE_FUSED)
def moe_gate_up_down() -> KeyMapper:
    return Chain([FusedExperts(), Tied()])


@register_key_mapper("mixtral", "minimax", "minimax_m2", fused=MIXTRAL_FUSED)
def moe_w1_w2_w3() -> KeyMapper:
    # On disk: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down), block_sparse_moe.gate (router).
    renames = Renames([(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight")])
    return Chain([FusedExperts(gate="w1", up="w3", down="w2", ckpt_module=("mlp", "block_sparse_moe")), Tied()],
                 renames=renames)


@register_key_mapper("mistral3", "pixtral", "llava", fused=VLM_FUSED)
def mistral3_vlm() -> KeyMapper:
    """A VLM checkpoint (either layout) for the VLM class or for its text model alone (``model.layers.*``,
    e.g. ``Ministral3ForCausalLM``: the tower and projector are then unexpected, see ``strict``)."""
    renames = Renames([*VLM_RENAMES.rules, *TEXT_FROM_VLM.rules])
    return Chain([Tied(source="model.language_model.embed_tokens.weight", renames=renames)], renames=renames)


@register_key_mapper("torchtitan_llama")
def torchtitan_llama() -> KeyMapper:
    """torchtitan's native Llama names -> HF checkpoint names (the checkpoint's fused groups are Llama's)."""
    return Chain([], renames=Renames([
        (r"^tok_embeddings\.", "model.embed_tokens."),
        (r"^norm\.", "model.norm."),
        (r"^output\.", "lm_head."),
        (r"^layers\.(\d+)\.attention\.wq\.", r"model.layers.\1.self_attn.q_proj."),
        (r"^layers\.(\d+)\.attention\.wk\.", r"model.layers.\1.self_attn.k_proj."),
        (r"^layers\.(\d+)\.attention\.wv\.", r"model.layers.\1.self_attn.v_proj."),
        (r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
        (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
        (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    ]))
