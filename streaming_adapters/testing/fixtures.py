"""Fabricate realistic sharded FP8 checkpoints from transformers configs (no model hub is reachable).

Tensor names and shapes come from the real transformers model class built on the meta device, mapped to
the on-disk layout by transformers' own ``revert_weight_conversion`` (so MoE experts are per expert, as
``save_pretrained`` writes them).  Values are seeded per tensor name, so a checkpoint is reproducible and
can be written one file at a time (memory: one file's tensors).

Formats (``fmt``):

    fp8_block            quant_method fp8, F32 weight_scale_inv, block from ``block`` (default 128x128)
    fp8_block_ue8m0      ... power-of-two F32 scales, scale_fmt ue8m0
    fp8_block_e8m0       ... scales stored as F8_E8M0
    fp8_block_u8         ... scales stored as U8 exponent bytes
    fp8_tensor           Mistral per-tensor: BF16 0-dim weight_scale_inv + activation_scale
    ct_tensor / ct_channel / ct_group / ct_block      compressed-tensors float-quantized (W8A8 static
                         input_scale for ct_tensor), BF16 weight_scale
    ct_naive_channel     compressed-tensors naive-quantized (W8A16)
    modelopt             ModelOpt FP8: F32 0-dim weight_scale, input_scale, k_scale / v_scale
    fbgemm               fbgemm_fp8: F32 [N, 1] weight_scale
    bf16                 no quantization_config

Families: the text models of ``FAMILIES`` and ``ministral3_vlm`` (``Mistral3ForConditionalGeneration``: a
ministral3 text model, a pixtral vision tower and a projector).  The VLM is written in either key layout
(``vlm_layout``): ``"new"`` (``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``lm_head.weight``, as recent exports) or ``"old"`` (``language_model.model.*``,
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.lm_head.weight``, as transformers'
``save_pretrained`` writes it).  The vision tower and projector are never quantized, as in real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0
FORMATS = (
    "fp8_block", "fp8_block_ue8m0", "fp8_block_e8m0", "fp8_block_u8", "fp8_tensor",
    "ct_tensor", "ct_channel", "ct_group", "ct_block", "ct_naive_channel", "modelopt", "fbgemm", "bf16",
)
FAMILIES = ("llama", "mistral", "ministral3", "qwen3", "qwen3_moe", "deepseek_v3", "mixtral", "ministral3_vlm")
VLM_LAYOUTS = ("new", "old")

# Small but awkward dims: hidden 320 = 2.5 blocks of 128, intermediate 200 (N % ceil(N/128) == 0 but
# N % 128 != 0: transformers' derived block is silently wrong there), vocab 1001 (divides by no world
# size), DeepSeek-V3 kv_a_proj_with_mqa = 512 + 64 = 576 rows (a 5-row grid).
_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=320, intermediate_size=200, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=64, vocab_size=1001, tie_word_embeddings=False),
    "mistral": dict(hidden_size=320, intermediate_size=200, num_hidden_layers=3, num_attention_heads=5,
                    num_key_value_heads=1, head_dim=64, vocab_size=1001, tie_word_embeddings=False),
    "ministral3": dict(hidden_size=320, intermediate_size=200, num_hidden_layers=3, num_attention_heads=5,
                       num_key_value_heads=1, head_dim=64, vocab_size=1001, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=320, intermediate_size=200, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=64, vocab_size=1001, tie_word_embeddings=False),
    "qwen3_moe": dict(hidden_size=320, intermediate_size=200, moe_intermediate_size=96, num_experts=5,
                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=5,
                      num_key_value_heads=1, head_dim=64, vocab_size=1001, decoder_sparse_step=1,
                      mlp_only_layers=[], tie_word_embeddings=False),
    "deepseek_v3": dict(hidden_size=256, intermediate_size=200, moe_intermediate_size=96, n_routed_experts=5,
                        n_shared_experts=1, num_experts_per_tok=2, num_hidden_layers=2, first_k_dense_replace=1,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=1001, q_lora_rank=384,
                        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, n_group=1,
                        topk_group=1, tie_word_embeddings=False),
    "mixtral": dict(hidden_size=320, intermediate_size=200, num_local_experts=5, num_experts_per_tok=2,
                    num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, head_dim=64,
                    vocab_size=1001, tie_word_embeddings=False),
}
# Pixtral tower of the VLM: 64x64 images of 16x16 patches, 2 layers; spatial merge 2 -> a 512-column merger.
_VLM_VISION: dict[str, Any] = dict(model_type="pixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, head_dim=32, image_size=64, patch_size=16)
_MODEL_TYPE = {"qwen3_moe": "qwen3_moe", "deepseek_v3": "deepseek_v3"}

# Not quantized by any producer: embeddings, lm_head, norms, routers, biases, and (Mistral's
# modules_to_not_convert) the vision tower and the multimodal projector.
_UNQUANTIZED = re.compile(r"(embed_tokens|lm_head|norm|\.mlp\.gate\.|block_sparse_moe\.gate\.|e_score_correction_bias|"
                          r"\.bias$|vision_tower\.|multi_modal_projector\.)")
# old VLM layout (transformers' save_pretrained) -> new layout (the model's own names)
_VLM_OLD_TO_NEW = ((re.compile(r"^language_model\.model\."), "model.language_model."),
                   (re.compile(r"^language_model\.lm_head\."), "lm_head."),
                   (re.compile(r"^(vision_tower|multi_modal_projector)\."), r"model.\1."))


def tiny_config(family: str, **overrides: Any):
    """A small transformers config of ``family`` with the awkward dims above (``overrides`` win)."""
    from transformers import AutoConfig

    if family == "ministral3_vlm":
        # Overrides go to the text model (num_hidden_layers=5 splits the language model, not the tower).
        text = {"model_type": "ministral3", **_TINY["ministral3"], **overrides}
        return AutoConfig.for_model("mistral3", text_config=text, vision_config=dict(_VLM_VISION),
                                    spatial_merge_size=2, tie_word_embeddings=text["tie_word_embeddings"])
    if family not in _TINY:
        raise ValueError(f"unknown family {family!r}; known: {sorted(_TINY) + ['ministral3_vlm']}")
    kwargs = {**_TINY[family], **overrides}
    return AutoConfig.for_model(_MODEL_TYPE.get(family, family), **kwargs)


def is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def build_meta_model(config):
    """The real transformers model class of ``config`` on the meta device (BF16)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vlm(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.bfloat16)


def disk_layout(config, vlm_layout: str = "new") -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, as ``save_pretrained`` of the real model class would write
    (for a VLM, ``vlm_layout="new"`` renames to the model's own ``model.language_model.*`` names)."""
    from transformers.core_model_loading import revert_weight_conversion

    if vlm_layout not in VLM_LAYOUTS:
        raise ValueError(f"vlm_layout={vlm_layout!r}; known: {VLM_LAYOUTS}")
    model = build_meta_model(config)
    sd = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    disk = revert_weight_conversion(model, sd)
    if is_vlm(config) and vlm_layout == "new":
        disk = {_vlm_new_name(k): v for k, v in disk.items()}
    return {k: tuple(v.shape) for k, v in sorted(disk.items())}


def _vlm_new_name(name: str) -> str:
    for pat, rep in _VLM_OLD_TO_NEW:
        new = pat.sub(rep, name)
        if new != name:
            return new
    return name


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and ".layers." in name and not _UNQUANTIZED.search(name)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def original_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The BF16 'original' weight of a tensor: N(0, 0.02) with row and column spread (so block scales
    differ by ~30x), a few outliers, exact zeros in one row; norms near 1."""
    g = torch.Generator().manual_seed(_seed(seed, name))
    if "norm" in name:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    if len(shape) != 2:  # biases; the vision tower's 4-D patch convolution
        return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    w = 0.02 * torch.randn(shape, generator=g)
    w *= torch.exp(0.8 * torch.randn(shape[0], 1, generator=g))
    w *= torch.exp(0.5 * torch.randn(1, shape[1], generator=g))
    n_out = max(1, w.numel() // 5000)
    idx = torch.randint(0, w.numel(), (n_out,), generator=g)
    w.view(-1)[idx] *= 20.0
    w[shape[0] // 3].zero_()
    return w.to(torch.bfloat16)


# -- FP8 producers (fabrication only; tests compare against their own independent reference) ------------
def _blocks_amax(w: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    n, k = w.shape
    gn, gk = math.ceil(n / bm), math.ceil(k / bn)
    pad = torch.zeros(gn * bm, gk * bn, dtype=torch.float32)
    pad[:n, :k] = w.abs()
    return pad.view(gn, bm, gk, bn).amax(dim=(1, 3))


def _expand(s: torch.Tensor, bm: int, bn: int, shape) -> torch.Tensor:
    return s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[: shape[0], : shape[1]]


def quantize_block(w: torch.Tensor, bm: int, bn: int, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32)
    amax = _blocks_amax(wf, bm, bn)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    codes = (wf / _expand(scale, bm, bn, wf.shape)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def _scale_dtype_cast(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype *before* quantizing, as producers do, so that codes and the
    stored scale agree."""
    return scale.to(dtype).to(torch.float32)


@dataclass
class FixtureInfo:
    path: Path
    family: str
    fmt: str
    config: Any
    tensors: dict[str, tuple[int, ...]]            # logical (dequantized) tensors
    quantized: list[str]
    files: list[str] = field(default_factory=list)


def quantize_tensor(name: str, w: torch.Tensor, fmt: str, block: tuple[int, int], group: int) -> dict[str, torch.Tensor]:
    """The stored tensors for one weight in format ``fmt`` (weight + its scales)."""
    mod = name[: -len(".weight")]
    n, k = w.shape
    wf = w.to(torch.float32)
    if fmt.startswith("fp8_block"):
        codes, scale = quantize_block(w, *block, ue8m0=fmt != "fp8_block")
        if fmt == "fp8_block_e8m0":
            return {name: codes, f"{mod}.weight_scale_inv": scale.to(torch.float8_e8m0fnu)}
        if fmt == "fp8_block_u8":
            return {name: codes, f"{mod}.weight_scale_inv": scale.to(torch.float8_e8m0fnu).view(torch.uint8)}
        return {name: codes, f"{mod}.weight_scale_inv": scale}
    if fmt in ("fp8_tensor", "modelopt"):
        sdt = torch.bfloat16 if fmt == "fp8_tensor" else torch.float32
        amax = wf.abs().max()
        scale = _scale_dtype_cast(torch.where(amax > 0, amax / FP8_MAX, torch.ones(())), sdt)
        codes = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        act = torch.tensor(0.01 + (_seed(0, name) % 997) / 1e5).to(sdt)
        if fmt == "fp8_tensor":
            return {name: codes, f"{mod}.weight_scale_inv": scale.to(sdt), f"{mod}.activation_scale": act}
        out = {name: codes, f"{mod}.weight_scale": scale.to(sdt), f"{mod}.input_scale": act}
        if mod.endswith("k_proj"):
            out[f"{mod}.k_scale"] = torch.tensor(0.0125, dtype=torch.float32)
        if mod.endswith("v_proj"):
            out[f"{mod}.v_scale"] = torch.tensor(0.0075, dtype=torch.float32)
        return out
    if fmt.startswith("ct_") or fmt == "fbgemm":
        strategy = "channel" if fmt == "fbgemm" else fmt.split("_")[-1]
        bm, bn = {"tensor": (n, k), "channel": (1, k), "group": (1, group), "block": block}[strategy]
        sdt = torch.float32 if fmt == "fbgemm" else torch.bfloat16
        amax = _blocks_amax(wf, bm, bn)
        scale = _scale_dtype_cast(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)), sdt)
        codes = (wf / _expand(scale, bm, bn, wf.shape)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        stored = scale.reshape(1) if strategy == "tensor" else scale
        out = {name: codes, f"{mod}.weight_scale": stored.to(sdt)}
        if fmt == "ct_tensor":
            out[f"{mod}.input_scale"] = torch.tensor([0.02], dtype=torch.bfloat16)
        return out
    raise ValueError(f"unknown fmt {fmt!r}; known: {FORMATS}")


def quantization_config(fmt: str, block: tuple[int, int], group: int, skip: list[str]) -> dict[str, Any] | None:
    if fmt == "bf16":
        return None
    if fmt.startswith("fp8_block"):
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block), "modules_to_not_convert": skip}
        if fmt != "fp8_block":
            qc["scale_fmt"] = "ue8m0"
        return qc
    if fmt == "fp8_tensor":
        return {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                "dequantize": False, "modules_to_not_convert": skip}
    if fmt == "modelopt":
        return {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                "exclude_modules": skip, "producer": {"name": "modelopt", "version": "0.47.0"}}
    if fmt == "fbgemm":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": skip}
    strategy = fmt.split("_")[-1]
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
               "group_size": group if strategy == "group" else None,
               "block_structure": list(block) if strategy == "block" else None,
               "observer": "minmax", "observer_kwargs": {}, "actorder": None}
    naive = fmt == "ct_naive_channel"
    acts = None if naive else {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": fmt != "ct_tensor",
                               "strategy": "tensor" if fmt == "ct_tensor" else "token", "observer": None if fmt != "ct_tensor" else "minmax",
                               "observer_kwargs": {}, "group_size": None, "block_structure": None, "actorder": None}
    form = "naive-quantized" if naive else "float-quantized"
    return {"quant_method": "compressed-tensors", "format": form, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": form}},
            "ignore": skip, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None, "version": "0.20.0"}


def make_checkpoint(
    path: str | Path,
    family: str = "llama",
    fmt: str = "fp8_block",
    *,
    config=None,
    seed: int = 0,
    num_files: int = 3,
    block: tuple[int, int] = (128, 128),
    group: int = 128,
    scales_in_other_file: bool = False,
    tie_word_embeddings: bool | None = None,
    extra_files: bool = True,
    vlm_layout: str = "new",
    **config_overrides: Any,
) -> FixtureInfo:
    """Write an FP8 checkpoint of ``family`` in ``fmt`` to ``path`` (created) and describe it.

    ``scales_in_other_file`` moves every scale to the file after its weight's (scales may live anywhere
    the index says).  ``extra_files`` writes a tokenizer / generation config as real checkpoints have.
    ``vlm_layout`` (``"new"`` / ``"old"``) picks the key layout of a VLM checkpoint; text models ignore it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config is None:
        if tie_word_embeddings is not None:
            config_overrides["tie_word_embeddings"] = tie_word_embeddings
        config = tiny_config(family, **config_overrides)
    layout = disk_layout(config, vlm_layout)
    vlm = is_vlm(config)
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"] if fmt == "fp8_tensor" or vlm else ["lm_head"]
    qc = quantization_config(fmt, block, group, skip)

    names = list(layout)
    per_file = math.ceil(len(names) / num_files)
    file_of = {n: i // per_file for i, n in enumerate(_layer_order(names))}
    nfiles = max(file_of.values()) + 1
    fname = [f"model-{i + 1:05d}-of-{nfiles:05d}.safetensors" for i in range(nfiles)]
    quantized = [n for n in names if fmt != "bf16" and is_quantizable(n, layout[n])]
    weight_map: dict[str, str] = {}
    for i in range(nfiles):
        # Tensors of file i: its weights' own tensors, plus (scales_in_other_file) the previous file's scales.
        tensors: dict[str, torch.Tensor] = {}
        prev = (i - 1) % nfiles
        for name in (n for n in names if file_of[n] == i or (scales_in_other_file and file_of[n] == prev)):
            stored = _stored_tensors(name, layout[name], fmt, family, seed, block, group, name in quantized)
            for k, v in stored.items():
                home = (file_of[name] + 1) % nfiles if scales_in_other_file and _is_scale(k) else file_of[name]
                if home == i:
                    tensors[k] = v.contiguous()
                    weight_map[k] = fname[i]
        save_file(tensors, path / fname[i], metadata={"format": "pt"})

    cfg = config.to_dict()
    if qc is not None:
        cfg["quantization_config"] = qc
    cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if fmt == "modelopt":
        (path / "hf_quant_config.json").write_text(json.dumps({
            "producer": qc["producer"],
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": skip},
        }, indent=2))
    total = sum((path / f).stat().st_size for f in fname)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    if extra_files:
        (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "chat_template": "{{ messages }}"}))
    logical = {n: s for n, s in layout.items()}
    return FixtureInfo(path, family, fmt, config, logical, quantized, fname)


def _stored_tensors(name, shape, fmt, family, seed, block, group, quantize) -> dict[str, torch.Tensor]:
    w = original_tensor(name, shape, seed)
    if quantize:
        return quantize_tensor(name, w, fmt, block, group)
    if family == "deepseek_v3" and ".mlp.gate." in name:
        return {name: w.to(torch.float32)}  # DeepSeek-V3 ships its router and bias in F32
    return {name: w}


def _is_scale(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("weight_scale_inv", "weight_scale", "activation_scale", "input_scale",
                                       "k_scale", "v_scale")


def _layer_order(names: Iterable[str]) -> list[str]:
    def key(n: str):
        m = re.search(r"\.layers\.(\d+)\.", n)
        return (0 if "embed" in n else 2 if m is None else 1, int(m.group(1)) if m else 0, n)

    return sorted(names, key=key)
