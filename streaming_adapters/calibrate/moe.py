"""MoE experts for calibration: transformers 5's fused 3-D experts replaced by one ``nn.Linear`` per expert
projection, so that forward-pre hooks see every expert's input, and filled straight from the per-expert
checkpoint tensors (``experts.{e}.gate_proj.weight`` ... are the module names).

The forward is llm-compressor 0.14's ``LinearExperts2D`` (``modeling/moe/linear_experts.py``), so the
compressed-tensors output can match it bit for bit: per expert, ``down(act(gate(x)) * up(x))`` with
``torch.cat`` + ``chunk`` as transformers' ``_default_apply_gate`` does it, weighted and ``index_add_``-ed.
``all_experts`` (llm-compressor's ``moe_calibrate_all_experts``): every expert runs on every token (its amax
sees them all) and only the routed rows flow on; else each expert sees its routed tokens only (ModelOpt's
rule; ``scales.unify(experts=True)`` then takes the max over the layer's experts).

Memory: the same weights as the fused module (one layer at a time); with ``all_experts`` one expert's
intermediate activations for every token of a sample.
"""

from __future__ import annotations

import torch
from torch import nn


class _ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype)


class LinearExperts(nn.ModuleList):
    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn, all_experts: bool,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__([_ExpertMLP(hidden, inter, dtype) for _ in range(num_experts)])
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.all_experts = all_experts

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m = self[e]
        gate, up = torch.cat([m.gate_proj(x), m.up_proj(x)], dim=-1).chunk(2, dim=-1)
        return m.down_proj(self.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            top_k_pos, tokens = torch.where(mask[e])
            if self.all_experts:
                y = self._expert(e, hidden_states)[tokens]
            else:
                y = self._expert(e, hidden_states[tokens])
            y = y * top_k_weights[tokens, top_k_pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def linearize_experts(model: nn.Module, all_experts: bool) -> int:
    """Replace every fused experts module (3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]) of
    ``model`` (on meta) by :class:`LinearExperts`.  Returns how many were replaced."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter) and mod.gate_up_proj.dim() == 3
             and isinstance(getattr(mod, "down_proj", None), nn.Parameter)]
    for name, mod in found:
        e, two_i, h = mod.gate_up_proj.shape
        with torch.device("meta"):
            new = LinearExperts(e, h, two_i // 2, mod.act_fn, all_experts, mod.gate_up_proj.dtype)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return len(found)
