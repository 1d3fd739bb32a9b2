"""W4A4 calibration on one GPU at Mistral-Large-123B dimensions: memory and speed bars of issue 14.

Run on an H100/H200 (results with machine and date in docs/benchmarks.md; `tests/gpu/run_issues_14_15.sh` runs it):

    PYTHONPATH=. python benchmarks/calibration_w4a4.py --layers 2 --samples 512 --seq-len 2048 \
        --workdir /tmp/calib_bench

Fabricates an FP8 checkpoint with Mistral-Large shapes (hidden 12288, intermediate 28672, 96/8 heads) and
``--layers`` decoder layers, caps the process at ``--gpu-gib`` (24) with
``torch.cuda.set_per_process_memory_fraction``, calibrates with the host budget ``--host-gib`` (32; the rest
spills to ``--workdir``), and prints per layer: measured seconds, GPU peak, and the floor = forward FLOPs at the
measured BF16 matmul rate + the layer's FP8 bytes at the measured disk rate + the hidden-state traffic at the
measured H2D / D2H rates; then the extrapolated 88-layer time.  Results go to docs/benchmarks.md with the
machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

GiB = 1 << 30
SHAPE = dict(hidden_size=12288, intermediate_size=28672, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
             vocab_size=32768, tie_word_embeddings=False)


def matmul_rate(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def copy_rates(nbytes: int = GiB) -> tuple[float, float]:
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for src, dst in ((h, d), (d, h)):
        dst.copy_(src)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(5 * nbytes / (time.perf_counter() - t))
    return rates[0], rates[1]


def drop_caches() -> None:
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")  # cold when allowed (root)


def disk_rate(files: list[Path]) -> float:
    """Cold read rate of ``files``; the page cache is dropped again after, so the timed run starts cold too
    (before 2026-12-07 it started with the checkpoint cached by this measurement)."""
    drop_caches()
    t, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    rate = n / (time.perf_counter() - t)
    drop_caches()
    return rate


def attention_flops(seq_len: int, hidden: int, attn: str) -> int:
    """QK^T and PV of one row: eager computes the whole S x S score matrix; sdpa's causal kernels skip the
    masked half."""
    return (4 if attn == "eager" else 2) * seq_len * seq_len * hidden


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpu-gib", type=float, default=24)
    ap.add_argument("--host-gib", type=float, default=32)
    ap.add_argument("--workdir", default="/tmp/calib_bench")
    ap.add_argument("--attn", default="eager",
                    help="eager (llm-compressor's, the compressed-tensors default) or sdpa (ModelOpt's)")
    args = ap.parse_args()

    from streaming_adapters.calibrate.data import CalibrationTokens
    from streaming_adapters.calibrate.engine import calibrate_activations
    from streaming_adapters.checkpoint.index import CheckpointIndex
    from streaming_adapters.convert.plan import make_plan
    from streaming_adapters.formats import get_adapter
    from streaming_adapters.testing.fixtures import make_checkpoint

    work = Path(args.workdir)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, "mistral", "fp8_block", num_hidden_layers=args.layers, **SHAPE)
    index = CheckpointIndex.open(ckpt)
    plan = make_plan(index, get_adapter(ckpt, index=index), "nvfp4", None, 1)
    targets = {n[: -len(".weight")] for n, q in plan.nvfp4.items() if q}
    torch.cuda.set_per_process_memory_fraction(args.gpu_gib * GiB / torch.cuda.get_device_properties(0).total_memory)
    g = torch.Generator().manual_seed(0)
    toks = CalibrationTokens([torch.randint(0, SHAPE["vocab_size"], (args.seq_len,), generator=g)
                              for _ in range(args.samples)], "random", args.seq_len)

    flops_rate = matmul_rate()
    h2d, d2h = copy_rates()
    disk = disk_rate(sorted(ckpt.glob("*.safetensors")))
    t = time.perf_counter()
    res = calibrate_activations(ckpt, toks, targets, device="cuda", host_budget_bytes=int(args.host_gib * GiB),
                                work_dir=work / "spill", progress=True,
                                attn_implementation=args.attn)
    wall = time.perf_counter() - t

    h, i, kv, s = SHAPE["hidden_size"], SHAPE["intermediate_size"], 8 * 128, args.seq_len
    params = h * (2 * h + 2 * kv) + 3 * h * i
    tokens = args.samples * s
    flops = 2 * params * tokens + attention_flops(s, h, args.attn) * args.samples
    fp8_bytes = params * (1 + 4 / (128 * 128))                           # codes + block scales
    traffic = tokens * h * 2
    floor = flops / flops_rate + fp8_bytes / disk + traffic / h2d + traffic / d2h
    rows = []
    print(f"BF16 matmul {flops_rate / 1e12:.0f} TFLOP/s, disk {disk / 1e9:.2f} GB/s, H2D {h2d / 1e9:.1f} GB/s, "
          f"D2H {d2h / 1e9:.1f} GB/s; attention {args.attn}: {res.attention_kernel}; hidden states "
          f"{'spilled' if res.spilled else 'in host memory'}")
    print(f"{'layer':>5} {'seconds':>8} {'fill s':>7} {'floor s':>8} {'ratio':>6} {'GPU peak GiB':>12} "
          f"{'host peak GiB':>13} {'+ hidden GiB':>12}")
    for L in res.layers:
        rows.append({**L, "floor_s": floor})
        print(f"{L['layer']:>5} {L['seconds']:>8.2f} {L['fill_s']:>7.2f} {floor:>8.2f} {L['seconds'] / floor:>6.2f} "
              f"{(L['peak_gpu_bytes'] or 0) / GiB:>12.2f} {L['peak_host_bytes'] / GiB:>13.2f} "
              f"{L.get('hidden_host_bytes', 0) / GiB:>12.2f}")
    per_layer = sum(L["seconds"] for L in res.layers[1:]) / max(1, len(res.layers) - 1)
    print(f"total {wall:.1f} s; 88 layers extrapolated: {88 * per_layer / 60:.1f} min on one GPU")
    (work / "calibration_bench.json").write_text(json.dumps({"rows": rows, "wall_s": wall, "tflops": flops_rate / 1e12,
                                                           "disk_gbps": disk / 1e9, "h2d": h2d, "d2h": d2h,
                                                           "attn": args.attn, "attention_kernel": res.attention_kernel},
                                                          indent=1))


if __name__ == "__main__":
    main()
