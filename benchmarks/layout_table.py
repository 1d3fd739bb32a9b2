"""The "which layout fits my model" table of the README: the pre-flight planner on header-only (sparse)
checkpoints with the real shapes of full models.  ``python benchmarks/layout_table.py [/tmp/hdr] [SHAPE ...]``
(SHAPE: llama70b, mistral_large_123b, deepseek_v3; default all: ~40 s of CPU, most of it DeepSeek-V3's
256 x 61 experts)

Weights only: the BF16 shard each GPU holds after the load plus the load's own transient (the pipeline's
staging ring); training adds activations, gradients and optimizer state on top.  The naive path is
``FineGrainedFP8Config(dequantize=True)``: the whole BF16 model on every GPU, whatever the layout."""

from __future__ import annotations

import sys
from pathlib import Path

from streaming_adapters.bench.checkpoint import fabricate_headers
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.formats import get_adapter
from streaming_adapters.layouts import Layout
from streaming_adapters.preflight import GiB, plan_load

MODELS = [  # (name, shape, layers, experts)
    ("Llama-3.1-70B (FP8 block)", "llama70b", 80, 0),
    ("Mistral-Large / Devstral-2 123B", "mistral_large_123b", 88, 0),
    ("DeepSeek-V3 671B (MoE, 256 experts)", "deepseek_v3", 61, 256),
]
LAYOUTS = [Layout(tp=8), Layout(tp=4), Layout(tp=8, dp_shard=2), Layout(tp=8, ep=8), Layout(tp=8, dp_shard=4)]
H100, H200 = 80 * 1e9 / GiB, 141 * 1e9 / GiB  # usable GiB, roughly


def main(root: str = "/tmp/hdr", *only: str) -> None:
    print("| model | FP8 checkpoint | layout (GPUs) | BF16 shard / GPU | GPU need / GPU | fits H100 80 GB | "
          "fits H200 141 GB | naive path / GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, layers, experts in MODELS:
        if only and shape not in only:
            continue
        path = fabricate_headers(Path(root) / shape, shape, layers, experts=experts or 16)
        index = CheckpointIndex.open(path)
        adapter = get_adapter(path, index=index)
        for lay in LAYOUTS:
            if lay.ep > 1 and not experts:
                continue
            pf = plan_load(index, adapter, lay, device="cuda", suggest=False)
            need = max(r.gpu_bytes for r in pf.ranks) / GiB
            shard = max(r.shard_bytes for r in pf.ranks) / GiB
            print(f"| {name} | {index.total_bytes / 1e9:.0f} GB | tp={lay.tp} dp={lay.dp_shard} ep={lay.ep} "
                  f"({lay.world_size}) | {shard:.1f} GiB | {need:.1f} GiB | {'yes' if need < H100 else 'no'} | "
                  f"{'yes' if need < H200 else 'no'} | {pf.naive_bytes / GiB:.0f} GiB "
                  f"({'fits H200 only' if pf.naive_bytes / GiB < H200 else 'fits no GPU'}) |")


if __name__ == "__main__":
    main(*sys.argv[1:])
