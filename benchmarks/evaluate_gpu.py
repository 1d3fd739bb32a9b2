"""evaluate on one GPU at Mistral-Large-123B dimensions: the 24 GiB / 1.3x-of-floor bar of issue 15.

Run on an H100/H200 (results with machine and date in docs/benchmarks.md; `tests/gpu/run_issues_14_15.sh` runs it):

    PYTHONPATH=. python benchmarks/evaluate_gpu.py --layers 2 --rows 128 --seq-len 2048 --workdir /tmp/eval_bench

Fabricates an FP8 checkpoint with Mistral-Large shapes and ``--layers`` decoder layers, converts it to NVFP4
(compressed-tensors, on the GPU), caps the process at ``--gpu-gib`` (24) with
``torch.cuda.set_per_process_memory_fraction``, evaluates ``--rows`` random rows (host budget ``--host-gib``,
the rest spilled), and prints per layer: measured seconds and the floor = forward FLOPs at the measured BF16
matmul rate + the layer's NVFP4 bytes at the measured disk rate + the hidden-state H2D / D2H traffic (the
floor helpers are calibration_w4a4.py's), and the GPU peak.  Results go to docs/benchmarks.md with machine
and date.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernels.py shadows `kernels`

import torch  # noqa: E402

spec = importlib.util.spec_from_file_location("calibration_w4a4", HERE / "calibration_w4a4.py")
cw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cw)
GiB, SHAPE = cw.GiB, cw.SHAPE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpu-gib", type=float, default=24)
    ap.add_argument("--host-gib", type=float, default=32)
    ap.add_argument("--workdir", default="/tmp/eval_bench")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation of the streamed layers (eager, sdpa)")
    a = ap.parse_args()
    import streaming_adapters as sa
    from streaming_adapters.testing.fixtures import make_checkpoint

    work = Path(a.workdir)
    fp8, nv = work / "fp8", work / "nvfp4"
    if not (fp8 / "config.json").exists():
        make_checkpoint(fp8, "mistral", "fp8_block", num_hidden_layers=a.layers, **SHAPE)
    if not (nv / "config.json").exists():
        sa.convert_checkpoint(fp8, nv, target="nvfp4", device="cuda")
    torch.cuda.set_per_process_memory_fraction(a.gpu_gib * GiB / torch.cuda.get_device_properties(0).total_memory)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, SHAPE["vocab_size"], (a.seq_len,), generator=g) for _ in range(a.rows)]
    flops_rate = cw.matmul_rate()
    h2d, d2h = cw.copy_rates()
    disk = cw.disk_rate(sorted(nv.glob("*.safetensors")))
    torch.cuda.reset_peak_memory_stats()
    r = sa.evaluate(nv, rows, device="cuda", host_budget_bytes=int(a.host_gib * GiB), work_dir=work / "spill",
                    out_dir=work / "out", progress=True, attn_implementation=a.attn)
    peak = torch.cuda.max_memory_allocated()
    h, i, kv, s = SHAPE["hidden_size"], SHAPE["intermediate_size"], 8 * 128, a.seq_len
    params = h * (2 * h + 2 * kv) + 3 * h * i
    tokens = a.rows * s
    flops = 2 * params * tokens + cw.attention_flops(s, h, a.attn) * a.rows
    nvfp4_bytes = params * (0.5 + 1 / 16)  # codes + E4M3 block scales
    traffic = tokens * h * 2
    floor = flops / flops_rate + nvfp4_bytes / disk + traffic / h2d + traffic / d2h
    print(f"BF16 matmul {flops_rate / 1e12:.0f} TFLOP/s, disk {disk / 1e9:.2f} GB/s, H2D {h2d / 1e9:.1f} GB/s, "
          f"D2H {d2h / 1e9:.1f} GB/s; floor per layer {floor:.1f} s; GPU peak {peak / GiB:.2f} GiB "
          f"(cap {a.gpu_gib} GiB); attention {a.attn}: {r['attention_kernel']}; hidden states "
          f"{'spilled' if r['spilled'] else 'in host memory'}")
    print("perplexity of random weights at these dims is astronomically large by construction (logits of random "
          "12288-wide layers); quality is measured on the trained model (benchmarks/quality_table.py)")
    for k, t in enumerate(r["layer_seconds"]):
        print(f"layer {k}: {t:.1f} s = {t / floor:.2f} x floor")
    (work / "evaluate_bench.json").write_text(json.dumps({"layer_seconds": r["layer_seconds"], "floor_s": floor,
                                                          "gpu_peak_bytes": peak, "perplexity": r["perplexity"],
                                                          "attention_kernel": r["attention_kernel"]},
                                                         indent=1))


if __name__ == "__main__":
    main()
