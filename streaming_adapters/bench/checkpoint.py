"""Benchmark checkpoints with real layer shapes, fabricated fast (random FP8 codes and scales).

Values are random codes (NaN codes excluded) and positive scales: the work per byte is what a real
checkpoint costs, and no quantization step is needed to write 8 GB.  Shapes:

    llama70b            hidden 8192, intermediate 28672, 64/8 heads, vocab 32000 (anchors.md's 7.9 GB / 8 layers)
    mistral_large_123b  hidden 12288, intermediate 28672, 96/8 heads, vocab 32768 (Devstral-2 / Mistral-Large)
    deepseek_v3         MLA + MoE: hidden 7168, moe_intermediate 2048, q_lora 1536, kv_lora 512;
                        ``experts`` routed experts per layer (256 in the real model)
    tiny                a few MB, for the CI smoke run
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..testing.fixtures import disk_layout, is_quantizable

SHAPES = {
    "llama70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                               num_key_value_heads=8, head_dim=128, vocab_size=32000, tie_word_embeddings=False)),
    "mistral_large_123b": ("mistral", dict(hidden_size=12288, intermediate_size=28672, num_attention_heads=96,
                                           num_key_value_heads=8, head_dim=128, vocab_size=32768,
                                           tie_word_embeddings=False)),
    "deepseek_v3": ("deepseek_v3", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=0,
                                        num_attention_heads=128, num_key_value_heads=128, vocab_size=32000,
                                        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                                        qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
                                        tie_word_embeddings=False)),
    "tiny": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=128, vocab_size=8000, tie_word_embeddings=False)),
}


def bench_config(shape: str, layers: int, experts: int = 16):
    from transformers import AutoConfig

    family, kw = SHAPES[shape]
    kw = dict(kw, num_hidden_layers=layers)
    if family == "deepseek_v3":
        kw["n_routed_experts"] = experts
    return AutoConfig.for_model(family, **kw)


def fabricate(path: str | Path, shape: str = "llama70b", layers: int = 2, *, block: int = 128, seed: int = 0,
              experts: int = 16) -> Path:
    """Write a block-FP8 checkpoint (one file per decoder layer) unless ``path`` already has one."""
    path = Path(path)
    if (path / "model.safetensors.index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = bench_config(shape, layers, experts)
    layout = disk_layout(config)
    # Random bytes on the GPU when there is one: ~100x faster than the CPU generator for 8-20 GB.
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    files: dict[str, list[str]] = {}
    for name in layout:
        i = name.split(".layers.")[1].split(".")[0] if ".layers." in name else ("first" if "embed" in name else "last")
        files.setdefault(str(i), []).append(name)
    keys = sorted(files, key=lambda k: (k != "first", k == "last", int(k) if k.isdigit() else 0))
    weight_map = {}
    for fi, key in enumerate(keys):
        fname = f"model-{fi + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for name in files[key]:
            shape_ = layout[name]
            if is_quantizable(name, shape_):
                codes = torch.randint(0, 254, shape_, dtype=torch.uint8, generator=g, device=gen_dev)
                codes[codes == 0x7F] = 0x7E  # no NaN codes
                tensors[name] = codes.cpu().view(torch.float8_e4m3fn)
                grid = (math.ceil(shape_[0] / block), math.ceil(shape_[1] / block))
                tensors[name[: -len(".weight")] + ".weight_scale_inv"] = \
                    (torch.rand(grid, generator=g, device=gen_dev) * 1e-3 + 1e-5).cpu()
            else:
                tensors[name] = (torch.randn(shape_, generator=g, device=gen_dev) * 0.02).to(torch.bfloat16).cpu()
        save_file(tensors, path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def fabricate_headers(path: str | Path, shape: str, layers: int, *, block: int = 128, experts: int = 256) -> Path:
    """A block-FP8 checkpoint of real size whose files are headers plus holes (sparse, ~no disk): enough for
    everything that reads headers only (``streaming-adapters plan``), e.g. the full 88-layer 123B model."""
    from ..convert.layout import OutputTensor, layout_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = bench_config(shape, layers, experts)
    layout = disk_layout(config)
    tensors = []
    for name, shape_ in layout.items():
        if is_quantizable(name, shape_):
            tensors.append(OutputTensor(name, "F8_E4M3", shape_, name, "copy"))
            grid = (math.ceil(shape_[0] / block), math.ceil(shape_[1] / block))
            tensors.append(OutputTensor(name[: -len(".weight")] + ".weight_scale_inv", "F32", grid, name, "copy"))
        else:
            tensors.append(OutputTensor(name, "BF16", shape_, name, "copy"))
    lay = layout_file("model.safetensors", tensors)
    with open(path / "model.safetensors", "wb") as f:
        f.write(lay.header)
        f.truncate(lay.size)
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return path
