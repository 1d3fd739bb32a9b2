"""``CalibrationConfig``: the recipe keys (``calibration.*``) and the options of ``convert_checkpoint``'s
W4A4 mode.  Defaults are llm-compressor's (512 samples x 2048 tokens, batch 1, truncation, no padding), so
its ``oneshot`` can be the bit-exact reference (formats.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_SAMPLES = 512
DEFAULT_SEQ_LEN = 2048
# 32 GiB of hidden states on the host before spilling to disk: 512 x 2048 tokens at hidden 12288 (Mistral
# Large) are 24 GiB of BF16, so the 123B bar stays in memory; larger runs spill (docs/calibration.md).
DEFAULT_HOST_BUDGET_GB = 32.0
# The attention implementations the streamed layers run: both take the additive causal / sliding-window mask
# the model's own forward builds, on every device (flash-attention kernels would need a GPU and a package).
ATTENTIONS = ("eager", "sdpa")


@dataclass
class CalibrationConfig:
    """W4A4 NVFP4: calibrate one activation scale per quantized Linear (``data`` set = W4A4, else W4A16)."""

    data: Optional[str] = None
    """Calibration data: a .jsonl (text / messages / input_ids per line), a datasets.save_to_disk folder, or a
    .safetensors / .pt file holding input_ids [N, S]. Unset: weight-only NVFP4A16."""
    tokenizer: Optional[str] = None
    """Tokenizer folder for text / messages data (default: the checkpoint folder)."""
    samples: int = DEFAULT_SAMPLES
    """Calibration samples taken (the first N; fewer in the data is an error)."""
    seq_len: int = DEFAULT_SEQ_LEN
    """Tokens per sample at most (longer samples are truncated; no padding)."""
    host_budget_gb: float = DEFAULT_HOST_BUDGET_GB
    """Hidden states of all samples kept on the host up to this size; beyond it they spill to work_dir."""
    work_dir: Optional[str] = None
    """Folder for spilled hidden states and the resume state (default: <output>.partial/.calibration)."""
    persist_every_s: Optional[float] = 600.0
    """Hidden states kept in memory are saved to work_dir at the first layer boundary this many seconds after
    the last save, so a killed run resumes there (0: every layer; null: never, a killed run calibrates again).
    Spilled runs resume at every layer anyway."""
    moe_all_experts: Optional[bool] = None
    """MoE: every expert sees every token while calibrating (llm-compressor's rule; the default for
    compressed-tensors) or routed tokens with the max over the layer's experts (ModelOpt's; the default for
    modelopt). Unset: the output format's producer's rule."""
    attention: Optional[str] = None
    """Attention while calibrating: eager or sdpa. Unset: the output format's producer's (eager for
    compressed-tensors, as llm-compressor; sdpa for modelopt), which keeps the input scales bit-exact to it.
    sdpa for compressed-tensors calibrates a Mistral-Large layer 1.5x faster (H100, 2026-12-07,
    docs/benchmarks.md); an amax may then differ from llm-compressor's by a BF16 ulp."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 1:
            raise ValueError(f"calibration.samples and calibration.seq_len must be >= 1 (got {self.samples}, "
                             f"{self.seq_len})")
        if self.persist_every_s is not None and self.persist_every_s < 0:
            raise ValueError(f"calibration.persist_every_s must be >= 0 or null (got {self.persist_every_s})")
        if self.attention not in (None, *ATTENTIONS):
            raise ValueError(f"calibration.attention must be eager, sdpa or null (got {self.attention!r})")
        if self.host_budget_gb < 0:
            raise ValueError(f"calibration.host_budget_gb must be >= 0 (got {self.host_budget_gb})")
