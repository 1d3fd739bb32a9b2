"""An independent reference dequantizer: whole tensors, loaded with ``safetensors.torch.load_file``,
expanded scale grids, the formula of formats.md §1.1.  Shares no code with the package on purpose
(scale names, block sizes and encodings are re-derived here from config.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_all(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _scale_value(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:  # UE8M0 exponent bytes
        return torch.where(t == 255, torch.tensor(float("nan")), torch.exp2(t.to(torch.float32) - 127))
    return t.to(torch.float32)


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    n, k = shape
    grid = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    s = scale.reshape(grid)
    s = s.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return s


def reference_state_dict(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every logical tensor of an FP8 checkpoint, dequantized as ``(fp32(w) * fp32(s)).to(dtype)``."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    raw = load_all(path)
    scale_names = {"fp8": ("weight_scale_inv",), "compressed-tensors": ("weight_scale",),
                   "modelopt": ("weight_scale",), "fbgemm_fp8": ("weight_scale",)}.get(method, ())
    hidden = {"weight_scale_inv", "weight_scale", "activation_scale", "input_scale", "k_scale", "v_scale"}
    out = {}
    for name, t in raw.items():
        if name.rsplit(".", 1)[-1] in hidden:
            continue
        if t.dtype != torch.float8_e4m3fn:
            out[name] = t
            continue
        mod = name[: -len(".weight")]
        sname = next(f"{mod}.{s}" for s in scale_names if f"{mod}.{s}" in raw)
        s = _scale_value(raw[sname])
        n, k = t.shape
        if method == "fp8" and qc.get("weight_block_size"):
            block = tuple(qc["weight_block_size"])
        elif method == "compressed-tensors":
            w = qc["config_groups"]["group_0"]["weights"]
            block = {"tensor": (n, k), "channel": (1, k), "group": (1, w.get("group_size") or 1),
                     "block": tuple(w.get("block_structure") or (1, 1))}[w["strategy"]]
        elif s.numel() == 1:
            block = (n, k)
        else:
            block = (1, k)
        out[name] = (t.to(torch.float32) * _expand(s, (n, k), block)).to(dtype)
    return out


def reference_tensors(path: str | Path, names: list[str], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``reference_state_dict`` restricted to ``names`` (block FP8 or plain tensors), reading only those
    tensors and their scales: for checkpoints too large to dequantize whole."""
    from safetensors import safe_open

    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    if qc and (qc.get("quant_method") != "fp8" or not qc.get("weight_block_size")):
        raise ValueError("reference_tensors reads block FP8 (quant_method fp8) or unquantized checkpoints")

    def read(name: str) -> torch.Tensor:
        with safe_open(path / weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    out = {}
    for name in names:
        t = read(name)
        sname = name[: -len(".weight")] + ".weight_scale_inv"
        if t.dtype == torch.float8_e4m3fn:
            s = _scale_value(read(sname))
            t = t.to(torch.float32) * _expand(s, tuple(t.shape), tuple(qc["weight_block_size"]))
        out[name] = t.to(dtype)
    return out
