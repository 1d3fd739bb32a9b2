"""Key mappers per model family, registered by ``model_type`` (one decorator, like the format registry).

Add a family in a few lines::

    @register_key_mapper("my_moe")
    def my_moe() -> KeyMapper:
        return Chain([FusedExperts(gate="w1", up="w3", down="w2")], renames=Renames([(r"^model\\.", "")]))
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

from .keymap import Chain, FusedExperts, KeyMapper, Renames, Tied

_MAPPERS: dict[str, Callable[[], KeyMapper]] = {}

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


def register_key_mapper(*model_types: str):
    def deco(factory: Callable[[], KeyMapper]):
        for mt in model_types:
            if mt in _MAPPERS and _MAPPERS[mt] is not factory:
                warnings.warn(f"key mapper for {mt!r} re-registered", stacklevel=2)
            _MAPPERS[mt] = factory
        return factory

    return deco


def list_key_mappers() -> list[str]:
    return sorted(_MAPPERS)


def get_key_mapper(config: Mapping[str, Any] | Any) -> KeyMapper:
    """The mapper of a config's ``model_type`` (dict or transformers config); identity + tied otherwise."""
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    factory = _MAPPERS.get(mt or "", _MAPPERS["__default__"])
    return factory()


@register_key_mapper("__default__", "llama", "mistral", "qwen2", "qwen3", "ministral", "ministral3")
def dense() -> KeyMapper:
    return Chain([Tied(renames=TEXT_FROM_VLM)], renames=TEXT_FROM_VLM)


@register_key_mapper("qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "glm4_moe", "kimi_k2")
def moe_gate_up_down() -> KeyMapper:
    return Chain([FusedExperts(), Tied()])


@register_key_mapper("mixtral", "minimax", "minimax_m2")
def moe_w1_w2_w3() -> KeyMapper:
    # On disk: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down), block_sparse_moe.gate (router).
    renames = Renames([(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight")])
    return Chain([FusedExperts(gate="w1", up="w3", down="w2", ckpt_module=("mlp", "block_sparse_moe")), Tied()],
                 renames=renames)


@register_key_mapper("mistral3", "pixtral", "llava")
def mistral3_vlm() -> KeyMapper:
    """A VLM checkpoint (either layout) for the VLM class or for its text model alone (``model.layers.*``,
    e.g. ``Ministral3ForCausalLM``: the tower and projector are then unexpected, see ``strict``)."""
    renames = Renames([*VLM_RENAMES.rules, *TEXT_FROM_VLM.rules])
    return Chain([Tied(source="model.language_model.embed_tokens.weight", renames=renames)], renames=renames)


@register_key_mapper("torchtitan_llama")
def torchtitan_llama() -> KeyMapper:
    """torchtitan's native Llama names -> HF checkpoint names."""
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
