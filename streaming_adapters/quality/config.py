"""``EvaluateConfig``: the recipe keys ``evaluate.*`` (task=evaluate, recipes/evaluate.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# 32 GiB of hidden states on the host before spilling (as calibration): 128 rows x 2048 tokens at hidden
# 12288 are 6 GiB of BF16 per model, 12 GiB with a reference.
DEFAULT_HOST_BUDGET_GB = 32.0


@dataclass
class EvaluateConfig:
    """Perplexity (and KL / top-1 / per-layer error vs a reference), one decoder layer at a time."""

    data: Optional[str] = None
    """Rows to evaluate: a text file (.txt/.py/.md, cut into rows of seq_len), or calibration-style data
    (.jsonl, .safetensors / .pt input_ids [N, S], a datasets folder)."""
    reference: Optional[str] = None
    """A second checkpoint (e.g. the BF16 or FP8 original): adds KL, top-1 agreement and per-layer error."""
    emulate_activations: bool = False
    """W4A4: quantize-dequantize each quantized Linear's input with the stored input scale (NVFP4 W4A4 only)."""
    tokenizer: Optional[str] = None
    """Tokenizer folder for text (default: the checkpoint folder)."""
    samples: Optional[int] = None
    """Rows taken (the first N; unset: all)."""
    seq_len: int = 2048
    """Tokens per row at most."""
    host_budget_gb: float = DEFAULT_HOST_BUDGET_GB
    """Hidden states kept on the host up to this size (both models together); beyond it they spill to work_dir."""
    work_dir: Optional[str] = None
    """Folder for spilled hidden states (default: a temporary folder)."""
    out_dir: str = "evaluation"
    """Where rank 0 writes report.json and layers.svg (per-layer error plot)."""
    attn_implementation: str = "sdpa"
    """transformers attention of the streamed layers: sdpa (transformers' default) or eager.  Both give the
    whole model's logits bit for bit; sdpa never writes the rows x heads x S x S scores (at 96 heads x 2048
    tokens, ~10 GB of memory traffic a row), which made calibration's layer 1.51x its floor with eager and
    1.01x with sdpa on one H100 (docs/benchmarks.md, 2026-12-07)."""
