"""What calibration needs, from headers and config.json alone (``plan`` / ``dry_run`` print it).

Per rank:
    device   one decoder layer in BF16 (the largest) + the embedding + one sample's activations: the layer's
             widest intermediates (hidden x 4 + intermediate x 3 values per token, BF16) and, with eager attention,
             the scores and softmax of every head (heads x S^2 x (2 + 4) bytes) and the mask (S^2 x 2)
    host     the hidden states of the rank's samples (upper bound samples x seq_len / world x hidden x 2),
             kept in memory up to ``host_budget_gb``; beyond it two spill files of that size on disk
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.families import get_family
from ..report import _fmt_bytes
from .config import CalibrationConfig

GiB = 1 << 30


@dataclass
class CalibrationNeed:
    device_bytes: int
    host_bytes: int
    spill_bytes: int
    layer_bytes: int
    activation_bytes: int

    def lines(self, device: str) -> list[str]:
        where = "GPU" if device == "cuda" else "host (device=cpu)"
        return [f"calibration: {where} need {_fmt_bytes(self.device_bytes)} per rank (largest layer "
                f"{_fmt_bytes(self.layer_bytes)} + one sample's activations {_fmt_bytes(self.activation_bytes)}); "
                f"hidden states {_fmt_bytes(self.host_bytes)} in host memory per rank"
                + (f", {_fmt_bytes(self.spill_bytes)} spilled to disk (x2 files)" if self.spill_bytes else "")]


def calibration_need(logical: dict, config: dict, cal: CalibrationConfig, world: int) -> CalibrationNeed:
    text = config.get("text_config", config) if "hidden_size" not in config else config
    hidden = int(text["hidden_size"])
    inter = int(text.get("moe_intermediate_size") or 0) * int(text.get("num_experts_per_tok") or 0) \
        + int(text.get("intermediate_size") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    family = get_family(config)
    per_layer: dict[int, int] = {}
    embed = 0
    for name, lt in logical.items():
        n = 1
        for d in lt.shape:
            n *= d
        layer = family.layer_of(name)
        if layer:
            per_layer[layer[1]] = per_layer.get(layer[1], 0) + 2 * n
        elif "embed_tokens" in name:
            embed += 2 * n
    layer = max(per_layer.values(), default=0)
    s = cal.seq_len
    acts = s * (hidden * 4 + inter * 3) * 2 + heads * s * s * 6 + s * s * 2
    tokens = -(-cal.samples // world) * s
    states = tokens * hidden * 2
    budget = int(cal.host_budget_gb * GiB)
    in_host = states if states <= budget else 0
    return CalibrationNeed(device_bytes=layer + embed + acts, host_bytes=in_host,
                           spill_bytes=0 if in_host else states, layer_bytes=layer, activation_bytes=acts)


def problems(need: CalibrationNeed, device: str, host_capacity: float | None, gpu_capacity: float | None) -> list[str]:
    out = []
    cap = gpu_capacity if device == "cuda" else host_capacity
    if cap is not None and need.device_bytes + (need.host_bytes if device != "cuda" else 0) > cap:
        out.append(f"calibration needs {_fmt_bytes(need.device_bytes)} on the {'GPU' if device == 'cuda' else 'host'} "
                   f"per rank (capacity {_fmt_bytes(int(cap))}): lower calibration.seq_len (the attention scores "
                   f"grow with its square) or calibration.host_budget_gb")
    if device == "cuda" and host_capacity is not None and need.host_bytes > host_capacity:
        out.append(f"calibration keeps {_fmt_bytes(need.host_bytes)} of hidden states on the host per rank "
                   f"(capacity {_fmt_bytes(int(host_capacity))}): lower calibration.host_budget_gb (the rest spills "
                   f"to calibration.work_dir), calibration.samples, or add ranks")
    return out
