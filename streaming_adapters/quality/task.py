"""task=evaluate: the recipe's ``evaluate.*`` keys -> :func:`run.evaluate` on every rank."""

from __future__ import annotations

from typing import Any

import torch


def run_evaluate(cfg) -> dict[str, Any]:
    from ..errors import CheckpointError
    from .run import evaluate

    e = cfg.evaluate
    if e.data is None:
        raise CheckpointError("no evaluation data given", expected="evaluate.data=<text file or token file>",
                              fix="pass evaluate.data=... (a local .txt, .jsonl, .safetensors or .pt)")
    device = cfg.device
    if device == "cuda":
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return evaluate(cfg.checkpoint.path, e.data, reference=e.reference, emulate_activations=e.emulate_activations,
                    tokenizer=e.tokenizer, samples=e.samples, seq_len=e.seq_len, device=device,
                    host_budget_bytes=int(e.host_budget_gb * (1 << 30)), work_dir=e.work_dir,
                    attn_implementation=e.attn_implementation, out_dir=e.out_dir, progress=True)
