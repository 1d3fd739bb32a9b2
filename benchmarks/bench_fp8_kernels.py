"""FP8 -> BF16 dequant kernels on one GPU: the Triton kernel vs the torch multiply path vs a plain copy of
the same number of bytes (the practical ceiling).

    python benchmarks/bench_fp8_kernels.py            # the table (~1 min on an H200)
    python benchmarks/bench_fp8_kernels.py --sweep    # also time tile shapes for three layouts
    python benchmarks/bench_fp8_kernels.py --quick    # fewer cases

Bytes counted = codes read + scale window read + output written (each once).  Times are
``triton.testing.do_bench`` medians (it flushes L2 between repetitions); inputs are additionally rotated
among enough copies to exceed 3x the L2 size.  Every Triton result is checked bit for bit against
``fp8.dequantize_into`` (torch path, same GPU) before it is timed.  Full numbers go to $OUT/kernels.json when
$OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from streaming_adapters.numerics.fp8 import block_window, dequantize_into  # noqa: E402
from streaming_adapters.numerics.triton_fp8 import dequantize_into_triton, pick_tile, triton_available  # noqa: E402

DEV = "cuda"

# (name, box shape, box start, block, out dtype, out padding (left, right) columns of a wider shard)
CASES = [
    ("dsv3 7168x7168 blk128", (7168, 7168), (0, 0), (128, 128), torch.bfloat16, (0, 0)),
    ("dsv3 expert 2048x7168 blk128", (2048, 7168), (0, 0), (128, 128), torch.bfloat16, (0, 0)),
    ("moe up 18432x7168 blk128", (18432, 7168), (0, 0), (128, 128), torch.bfloat16, (0, 0)),
    ("kv_a TP shard 72x7168 @r72", (72, 7168), (72, 0), (128, 128), torch.bfloat16, (0, 0)),
    ("row shard 4096x7168 @r64", (4096, 7168), (64, 0), (128, 128), torch.bfloat16, (0, 0)),
    ("narrow out 7168x3584 of x7168", (7168, 3584), (0, 3584), (128, 128), torch.bfloat16, (3584, 0)),
    ("misaligned out (+3 cols)", (4096, 4096), (0, 0), (128, 128), torch.bfloat16, (3, 5)),
    ("per-channel 7168x7168", (7168, 7168), (0, 0), (1, 7168), torch.bfloat16, (0, 0)),
    ("per-tensor 7168x7168", (7168, 7168), (0, 0), (7168, 7168), torch.bfloat16, (0, 0)),
    ("group128 7168x7168", (7168, 7168), (0, 0), (1, 128), torch.bfloat16, (0, 0)),
    ("group32 7168x7168", (7168, 7168), (0, 0), (1, 32), torch.bfloat16, (0, 0)),
    ("blk 7x5 (gather) 4096x4096", (4096, 4096), (0, 0), (7, 5), torch.bfloat16, (0, 0)),
    ("fp16 out 7168x7168 blk128", (7168, 7168), (0, 0), (128, 128), torch.float16, (0, 0)),
    ("fp32 out 7168x7168 blk128", (7168, 7168), (0, 0), (128, 128), torch.float32, (0, 0)),
]
QUICK = {0, 3, 5, 7, 10}

SWEEP_TILES = [
    (16, 128, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8),
    (32, 256, 4), (64, 256, 4), (64, 256, 8), (16, 512, 4), (32, 512, 8), (8, 1024, 4),
    (64, 128, 4, 16), (128, 128, 8, 16), (64, 256, 8, 16),  # 16-byte code loads + a shared-memory relayout
]  # fmt: skip
SWEEP_CASES = [0, 7, 10]
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class Inputs:
    """``n`` copies of (codes, scale, out view) so that consecutive calls touch different memory."""

    def __init__(self, shape, start, block, dtype, pad, l2_bytes):
        rows, cols = shape
        self.lo, hi = block_window(start, shape, block)
        wshape = (hi[0] - self.lo[0], hi[1] - self.lo[1])
        self.nbytes = rows * cols * (1 + torch.empty(0, dtype=dtype).element_size()) + 4 * wshape[0] * wshape[1]
        n = max(2, -(-3 * l2_bytes // self.nbytes))
        self.sets = []
        for i in range(n):
            codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
            scale = torch.exp(torch.randn(wshape, device=DEV) * 3)
            shard = torch.empty(rows, pad[0] + cols + pad[1], dtype=dtype, device=DEV)
            self.sets.append((shard.narrow(1, pad[0], cols), codes, scale))
        self.start, self.block, self.i = start, block, 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def _same_bits(a, b):
    nan = b.isnan()
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.isnan(), nan) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


def run_case(case, l2_bytes, tile=None, with_torch=True):
    name, shape, start, block, dtype, pad = case
    inp = Inputs(shape, start, block, dtype, pad, l2_bytes)
    out, codes, scale = inp.sets[0]
    ref = torch.empty(shape, dtype=dtype, device=DEV)
    dequantize_into(ref, codes, scale, start, block, inp.lo, method="multiply")  # the torch path, not Triton
    out.fill_(-1234.5)
    assert dequantize_into_triton(out, codes, scale, start, block, inp.lo, tile=tile), f"{name}: declined"
    correct = _same_bits(out, ref)

    def triton_fn():
        o, c, s = inp.next()
        dequantize_into_triton(o, c, s, start, block, inp.lo, tile=tile)

    def torch_fn():
        o, c, s = inp.next()
        dequantize_into(o, c, s, start, block, inp.lo, method="multiply")

    t_triton = _bench(triton_fn)
    t_torch = _bench(torch_fn) if with_torch else float("nan")
    half = inp.nbytes // 2  # a copy of `half` bytes reads + writes the kernel's byte count
    src = torch.empty(half, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t_copy = _bench(lambda: dst.copy_(src))
    del inp, ref, src, dst
    torch.cuda.empty_cache()
    lo, hi = block_window(start, shape, block)
    gr_gc = (hi[0] - lo[0], hi[1] - lo[1])
    vec = 16 // torch.empty(0, dtype=dtype).element_size()  # the wrapper's alignment rule, for the table
    aligned = pad[0] % vec == 0 and (pad[0] + shape[1] + pad[1]) % vec == 0 and shape[1] % vec == 0
    return dict(
        name=name, shape=list(shape), block=list(block), dtype=str(dtype).removeprefix("torch."),
        tile=list(tile or pick_tile(block, gr_gc, aligned)), bytes=2 * half, correct=correct,
        t_triton_us=t_triton * 1e6, t_torch_us=t_torch * 1e6, t_copy_us=t_copy * 1e6,
        tbps_triton=2 * half / t_triton / 1e12, tbps_torch=2 * half / t_torch / 1e12, tbps_copy=2 * half / t_copy / 1e12,
    )  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time tile shapes for three layouts")
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    args = ap.parse_args()
    if not triton_available():
        sys.exit("needs a CUDA GPU and triton")
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)  # fmt: skip
    cases = [c for i, c in enumerate(CASES) if not args.quick or i in QUICK]
    rows = []
    for c in cases:
        rows.append(run_case(c, l2))
        r = rows[-1]
        print(f"  done {r['name']}: {r['tbps_triton']:.2f} TB/s", flush=True)
    sweep = []
    if args.sweep:
        for i in SWEEP_CASES:
            for tile in SWEEP_TILES:
                sweep.append(run_case(CASES[i], l2, tile=tile, with_torch=False))
                s = sweep[-1]
                print(f"  sweep {s['name']} {tuple(tile)}: {s['tbps_triton']:.2f} TB/s", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps({"cases": rows, "sweep": sweep}, indent=1))

    hdr = f"{'case':31} {'block':>11} {'out':>5} {'tile':>11} {'MB':>7} | {'triton us':>9} {'TB/s':>5} {'%copy':>5} | " \
          f"{'torch us':>9} {'TB/s':>5} {'x':>5} | {'copy TB/s':>9} ok"  # fmt: skip
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['name']:31} {'x'.join(map(str, r['block'])):>11} {_SHORT[r['dtype']]:>5} "
              f"{'/'.join(map(str, r['tile'])):>11} {r['bytes'] / 1e6:7.1f} | {r['t_triton_us']:9.1f} "
              f"{r['tbps_triton']:5.2f} {100 * r['tbps_triton'] / r['tbps_copy']:5.0f} | {r['t_torch_us']:9.1f} "
              f"{r['tbps_torch']:5.2f} {r['t_torch_us'] / r['t_triton_us']:5.1f} | {r['tbps_copy']:9.2f} "
              f"{'ok' if r['correct'] else 'BITS DIFFER'}")  # fmt: skip
    if sweep:
        print(f"\n{'sweep case':31} {'tile BR/BC/warps[/cv]':>21} {'us':>9} {'TB/s':>6} {'%copy':>6} ok")
        for s in sweep:
            print(f"{s['name']:31} {'/'.join(map(str, s['tile'])):>21} {s['t_triton_us']:9.1f} "
                  f"{s['tbps_triton']:6.2f} {100 * s['tbps_triton'] / s['tbps_copy']:6.0f} "
                  f"{'ok' if s['correct'] else 'BITS DIFFER'}")  # fmt: skip
    if not all(r["correct"] for r in rows + sweep):
        sys.exit("some Triton results differ from fp8.dequantize_into")


if __name__ == "__main__":
    main()
