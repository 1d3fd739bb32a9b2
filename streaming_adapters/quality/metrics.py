"""Per-row statistics and their reduction: perplexity, KL, top-1 agreement, per-layer hidden-state error.

Every statistic is first a per-row sum (fp64, computed on that row's rank: batch 1, so a row's numbers do
not depend on which rank ran it); ranks gather the rows' sums and every rank adds them in row order.  So
the totals are the same bits for any world size (tests/test_evaluate_dist.py) -- no all-reduce order.

* perplexity ``exp(sum NLL / tokens)``: next-token NLL of positions ``0 .. S-2`` from fp32 log-softmax of the
  model's BF16 logits (what transformers' ``ForCausalLMLoss`` upcasts to).
* KL ``mean_t sum_v p_ref (log p_ref - log p)`` (the reference's distribution first: the error the
  quantized model adds to it), top-1 agreement ``mean_t [argmax ref == argmax model]``.
* per layer: mean over tokens of the cosine between the model's and the reference's hidden state after the
  layer, and the relative L2 norm ``||h - h_ref|| / ||h_ref||`` over all tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def row_logit_stats(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None) -> dict[str, float]:
    """``logits`` [S, V] BF16 of one row, ``ids`` [S]: sums over its S-1 predicted positions."""
    lp = logits[:-1].float().log_softmax(-1)
    tgt = ids[1:].to(lp.device)
    out = {"tokens": float(tgt.numel()), "nll": float(-lp.gather(-1, tgt[:, None]).double().sum())}
    if ref_logits is not None:
        rp = ref_logits[:-1].float().log_softmax(-1)
        out["ref_nll"] = float(-rp.gather(-1, tgt[:, None]).double().sum())
        out["kl"] = float((rp.exp() * (rp - lp)).sum(-1).double().sum())
        out["top1"] = float((rp.argmax(-1) == lp.argmax(-1)).sum())
    return out


def row_hidden_stats(h: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """[cosine sum over tokens, ||h - ref||^2, ||ref||^2] of one row's hidden states (fp64)."""
    a, b = h.double(), ref.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30).sum()
    return [float(cos), float((a - b).pow(2).sum()), float(b.pow(2).sum())]


def reduce_rows(rows: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Totals from every row's sums, added in row order (``rows`` sorted by row index)."""
    t = {k: 0.0 for k in ("tokens", "nll", "ref_nll", "kl", "top1")}
    layers = [[0.0, 0.0, 0.0, 0.0] for _ in range(num_layers)]  # cos sum, diff^2, ref^2, positions
    for r in rows:
        for k in t:
            t[k] += r.get(k, 0.0)
        for i, (c, d, n) in enumerate(r.get("hidden", [])):
            layers[i][0] += c
            layers[i][1] += d
            layers[i][2] += n
            layers[i][3] += r["positions"]
    n = max(t["tokens"], 1.0)
    out: dict[str, Any] = {"rows": len(rows), "tokens": int(t["tokens"]), "nll": t["nll"] / n,
                           "perplexity": math.exp(t["nll"] / n)}
    if any("kl" in r for r in rows):
        out.update(ref_perplexity=math.exp(t["ref_nll"] / n), kl=t["kl"] / n, top1=t["top1"] / n,
                   layers=[{"layer": i, "cosine": c / max(p, 1.0), "rel_l2": math.sqrt(d / n2) if n2 > 0 else 0.0}
                           for i, (c, d, n2, p) in enumerate(layers)])
    return out
