"""NVFP4 input checkpoints for the tests, the producers' own decoders as oracles, and the bodies the gloo
ranks run (module-level so spawned ranks can import them).

Fixtures:
* ``make_nvfp4``: this project's FP8 -> NVFP4 conversion of an FP8 fixture (bit-identical to llm-compressor
  / ModelOpt, tests/test_convert_nvfp4.py), then for W4A4 the activation scales and config the producers
  add (formats.md §4: the weights of W4A4 are byte-identical to W4A16).
* ``make_random_nvfp4``: random packed bytes and every non-NaN E4M3 scale byte, odd row counts, a 3-D
  tensor: what no quantizer writes but every decoder must read the same way.

Oracles (no code shared with the package): compressed-tensors 0.20 ``NVFP4PackedCompressor.decompress``
per module; ModelOpt 0.47 ``NVFP4QTensor.dequantize`` (loaded as tests/producers.py does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from reference import load_all

CT, MO = "compressed-tensors", "modelopt"


# -- fixtures ------------------------------------------------------------------------------------------
def make_nvfp4(src: Path, dst: Path, fmt: str, *, w4a4: bool = False, hf_quant_only: bool = False) -> Path:
    """``src``: an FP8 checkpoint to convert, or an NVFP4A16 one of format ``fmt`` to copy (cheaper)."""
    from streaming_adapters.convert import convert_checkpoint

    if dst.exists():
        shutil.rmtree(dst)
    if json.loads((src / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8":
        convert_checkpoint(src, dst, target="nvfp4", format=fmt)
    else:
        shutil.copytree(src, dst)
    if w4a4:
        _add_activation_scales(dst, fmt)
    if hf_quant_only:  # ModelOpt exports read by TensorRT-LLM: the scheme only in hf_quant_config.json
        cfg = json.loads((dst / "config.json").read_text())
        cfg.pop("quantization_config")
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _add_activation_scales(dst: Path, fmt: str) -> None:
    """W4A4 = W4A16 + one activation scale per quantized Linear (an extra file, listed in the index) + the
    config's input_activations / quant_algo NVFP4 (formats.md §4)."""
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    packed = "weight_packed" if fmt == CT else "weight"
    gs = "weight_global_scale" if fmt == CT else "weight_scale_2"
    mods = [k[: -len(gs) - 1] for k in index["weight_map"] if k.endswith("." + gs)]
    extra = {}
    for i, mod in enumerate(sorted(mods)):
        amax = torch.tensor(1.5 + i / 8)
        if fmt == CT:
            extra[f"{mod}.input_global_scale"] = (2688.0 / amax).reshape(1).float()
        else:
            extra[f"{mod}.input_scale"] = (amax / 2688.0).reshape(()).float()
    save_file(extra, dst / "activation-scales.safetensors")
    index["weight_map"].update({k: "activation-scales.safetensors" for k in extra})
    index_path.write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    if fmt == CT:
        qc["config_groups"]["group_0"]["input_activations"] = {
            "dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "static_minmax",
            "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True, "type": "float"}
    else:
        qc["quant_algo"] = "NVFP4"
        qc["config_groups"]["group_0"]["input_activations"] = {"dynamic": False, "num_bits": 4, "type": "float",
                                                                "group_size": 16}
        hq = json.loads((dst / "hf_quant_config.json").read_text())
        hq["quantization"]["quant_algo"] = "NVFP4"
        (dst / "hf_quant_config.json").write_text(json.dumps(hq))
    (dst / "config.json").write_text(json.dumps(cfg))
    assert packed  # (names documented above)


RANDOM_SHAPES = {"a.weight": (37, 96), "b.weight": (64, 48), "c.weight": (3, 20, 32), "d.weight": (16, 160)}


def make_random_nvfp4(dst: Path, fmt: str, seed: int = 0) -> Path:
    """Random packed bytes (all 16 codes in both nibbles) and random E4M3 scale bytes (every byte but the
    two NaNs: subnormals, -0.0 and negative scales included), one global scale per tensor, plus a BF16
    norm.  ``b.weight`` has K = 48 (3 blocks): a 2-way column split cuts a block."""
    g = torch.Generator().manual_seed(seed)
    dst.mkdir(parents=True, exist_ok=True)
    t: dict[str, torch.Tensor] = {"norm.weight": torch.randn(96, generator=g).to(torch.bfloat16)}
    for i, (name, shape) in enumerate(RANDOM_SHAPES.items()):
        mod = name[: -len(".weight")]
        *lead, k = shape
        packed = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, generator=g)
        s = torch.randint(0, 256, (*lead, k // 16), dtype=torch.uint8, generator=g)
        s = torch.where((s & 0x7F) == 0x7F, s ^ 0x01, s)  # 0x7F / 0xFF are NaN
        scale = s.view(torch.float8_e4m3fn)
        glob = torch.tensor([3.1e3, 0.71, 2688.0 / 1.3, 1.0][i])
        if fmt == CT:
            t.update({f"{mod}.weight_packed": packed, f"{mod}.weight_scale": scale,
                      f"{mod}.weight_global_scale": glob.reshape(1)})
        else:
            t.update({f"{mod}.weight": packed, f"{mod}.weight_scale": scale, f"{mod}.weight_scale_2": 1 / glob})
    save_file(t, dst / "model.safetensors")
    if fmt == CT:
        qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
            "format": "nvfp4-pack-quantized", "targets": ["Linear"], "input_activations": None,
            "weights": {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group",
                        "symmetric": True}}}, "ignore": []}
    else:
        qc = {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "config_groups": {"group_0": {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}, "targets": ["Linear"]}}}
    (dst / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return dst


# -- oracles -------------------------------------------------------------------------------------------
def producer_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every logical tensor of an NVFP4 checkpoint as its producer's own decoder gives it (BF16 weights),
    other tensors as stored; activation / block / global scales dropped."""
    path = Path(path)
    raw = load_all(path)
    modelopt = (path / "hf_quant_config.json").exists() or \
        json.loads((path / "config.json").read_text()).get("quantization_config", {}).get("quant_method") == MO
    out = {}
    if not modelopt:
        from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
        from producers import SCHEME

        for k, v in raw.items():
            mod, _, leaf = k.rpartition(".")
            if leaf == "weight_packed":
                sd = {n: raw[f"{mod}.{n}"] for n in ("weight_packed", "weight_scale", "weight_global_scale")}
                lead = v.shape[:-1]
                flat = {"weight_packed": sd["weight_packed"].reshape(-1, v.shape[-1]),
                        "weight_scale": sd["weight_scale"].reshape(-1, sd["weight_scale"].shape[-1]),
                        "weight_global_scale": sd["weight_global_scale"]}
                w = NVFP4PackedCompressor.decompress(flat, SCHEME)["weight"]
                out[f"{mod}.weight"] = w.reshape(*lead, -1)
            elif leaf not in ("weight_scale", "weight_global_scale", "input_global_scale"):
                out[k] = v
        return out
    from producers import load_modelopt_nvfp4

    Q = load_modelopt_nvfp4()
    for k, v in raw.items():
        mod, _, leaf = k.rpartition(".")
        if leaf == "weight" and v.dtype == torch.uint8:
            shape = torch.Size((*v.shape[:-1], v.shape[-1] * 2))
            qt = Q(shape, torch.bfloat16, v)
            out[k] = qt.dequantize(dtype=torch.bfloat16, scale=raw[f"{mod}.weight_scale"],
                                   double_scale=raw[f"{mod}.weight_scale_2"], block_sizes={-1: 16})
        elif leaf not in ("weight_scale", "weight_scale_2", "input_scale"):
            out[k] = v
    return out


# -- bodies run on every gloo rank ---------------------------------------------------------------------
def tp_load_nvfp4(path: str, chunk_bytes: int = 1 << 16, io_backend: str = "mmap", gpu_pipeline=False):
    """TP over all ranks (column-parallel Shard(0), row-parallel Shard(1), see dist_bodies.tp_placement)
    into NaN-filled DTensors; every local shard against the producer's decode."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import streaming_adapters as sa
    from dist_bodies import _nan_dtensor, check_local_shards, tp_placement

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref = producer_state_dict(path)
    sd = {k: _nan_dtensor(v.shape, torch.float32 if v.dtype == torch.float32 else torch.bfloat16, mesh,
                          tp_placement(k, v.shape)) for k, v in ref.items()}
    report = sa.load_fp8_state_dict(sd, path, chunk_bytes=chunk_bytes, io_backend=io_backend,
                                    gpu_pipeline=gpu_pipeline, readers=3)
    return check_local_shards(sd, ref), report.quantized, report.adapter


def column_split_load(path: str, name: str):
    """``name`` as Shard(1) over all ranks: returns the error each rank raised (type name, message)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import streaming_adapters as sa
    from dist_bodies import _nan_dtensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    shape = producer_state_dict(path)[name].shape
    sd = {name: _nan_dtensor(shape, torch.bfloat16, mesh, [Shard(len(shape) - 1)])}
    try:
        sa.load_fp8_state_dict(sd, path)
    except Exception as e:  # noqa: BLE001 -- the test asserts on it
        return type(e).__name__, str(e), type(getattr(e, "first", e)).__name__
    return None
