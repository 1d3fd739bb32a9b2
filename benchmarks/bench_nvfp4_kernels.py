"""BF16 -> NVFP4 quantization on one GPU: the Triton kernel (triton_nvfp4.py) vs the torch path of nvfp4.py on
the same GPU vs a plain copy of the same number of bytes (the practical ceiling).

    python benchmarks/bench_nvfp4_kernels.py            # the table (~1-2 min on an H200)
    python benchmarks/bench_nvfp4_kernels.py --sweep    # also tiles x division path on two shapes
    python benchmarks/bench_nvfp4_kernels.py --quick    # fewer cases

Bytes counted = BF16 read (2 B/element) + packed codes (0.5 B) + E4M3 block scales (1/16 B) written, each
once: 2.5625 B/element.  Times are ``triton.testing.do_bench`` medians (it flushes L2 between repetitions);
inputs are also rotated among enough copies to exceed 3x the L2 size.  Every Triton result is checked bit
for bit against nvfp4.py's torch path on the same GPU before it is timed.  Full numbers go to
$OUT/kernels_nvfp4.json when $OUT is set.
"""

from __future__ import annotations

import functools

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from streaming_adapters.numerics import nvfp4 as nv  # noqa: E402
from streaming_adapters.numerics.triton_nvfp4 import (  # noqa: E402
    pick_tile,
    quantize_ct_triton,
    quantize_modelopt_triton,
    triton_available,
)

DEV = "cuda"
BYTES_PER_ELEM = 2 + 0.5 + 1 / 16

# (name, rows, K, producer, (left, right) padding columns of a wider BF16 shard: w is a narrow view of it)
CASES = [
    ("dsv3 dense 7168x7168", 7168, 7168, "ct", (0, 0)),
    ("dsv3 dense 7168x7168 modelopt", 7168, 7168, "modelopt", (0, 0)),
    ("expert 2048x7168", 2048, 7168, "ct", (0, 0)),
    ("expert down 7168x2048", 7168, 2048, "ct", (0, 0)),
    ("moe gate_up 36864x7168", 36864, 7168, "ct", (0, 0)),
    ("llama up 14336x4096", 14336, 4096, "modelopt", (0, 0)),
    ("kv_a 576x7168 (small)", 576, 7168, "ct", (0, 0)),
    ("narrow 7168x3584 of x7168", 7168, 3584, "ct", (3584, 0)),
    ("unaligned view (+2 cols)", 4096, 4096, "ct", (2, 6)),
    ("small K 65536x256", 65536, 256, "ct", (0, 0)),
    ("K=16 262144x16", 262144, 16, "modelopt", (0, 0)),
]
QUICK = {0, 2, 7, 8}

SWEEP_TILES = [(4, 32, 4), (8, 32, 4), (16, 32, 4), (32, 32, 8), (16, 32, 8), (8, 64, 4), (16, 64, 8), (32, 16, 4)]
SWEEP_CASES = [0, 3]
SWEEP_PATHS = [  # (label, kwargs): the production path, then per-element div_rn, then the SOFT conversions
    ("fast", dict()),
    ("div_rn", dict(fast=False)),
    ("soft", dict(soft=True)),
]


class Inputs:
    """``n`` copies of (w view, global scale) so that consecutive calls touch different memory."""

    def __init__(self, rows, k, producer, pad, l2_bytes):
        self.nbytes = int(rows * k * BYTES_PER_ELEM)
        n = max(2, -(-3 * l2_bytes // self.nbytes))
        self.sets = []
        for i in range(n):
            shard = torch.randn(rows, pad[0] + k + pad[1], device=DEV, dtype=torch.float32).mul_(0.02)
            shard[:, :: 97] *= 8  # a few outliers per row: spread block scales like real weights
            w = shard.to(torch.bfloat16).narrow(1, pad[0], k)
            amax = nv.tensor_amax(w)
            g = nv.ct_global_scale(amax) if producer == "ct" else nv.modelopt_scale_2(amax)
            self.sets.append((w, g))
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def run_case(case, l2_bytes, *, tile=None, kw=None, with_torch=True):
    name, rows, k, producer, pad = case
    kw = dict(kw or {})
    inp = Inputs(rows, k, producer, pad, l2_bytes)
    tri = quantize_ct_triton if producer == "ct" else quantize_modelopt_triton
    # The torch path of nvfp4.py (on CUDA it would otherwise dispatch to the very kernel under test).
    ref = functools.partial(nv.quantize_ct if producer == "ct" else nv.quantize_modelopt, use_triton=False)
    w, g = inp.sets[0]
    want = ref(w, g)
    got = tri(w, g, tile=tile, **kw)
    assert got is not None, f"{name}: declined"
    correct = torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    outs = [(torch.empty_like(want[0]), torch.empty_like(want[1])) for _ in inp.sets]

    def triton_fn():
        wi, gi = inp.next()
        tri(wi, gi, out=outs[inp.i], tile=tile, **kw)

    def torch_fn():
        wi, gi = inp.next()
        ref(wi, gi)

    t_triton = _bench(triton_fn)
    t_torch = _bench(torch_fn) if with_torch else float("nan")
    half = inp.nbytes // 2  # a copy of `half` bytes reads + writes the kernel's byte count
    src = torch.empty(half, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t_copy = _bench(lambda: dst.copy_(src))
    del inp, want, got, outs, src, dst
    torch.cuda.empty_cache()
    b = rows * k * BYTES_PER_ELEM
    return dict(
        name=name, rows=rows, k=k, producer=producer, pad=list(pad), path=kw,
        tile=list(tile or pick_tile(k // 16, rows)), bytes=b, correct=correct,
        t_triton_us=t_triton * 1e6, t_torch_us=t_torch * 1e6, t_copy_us=t_copy * 1e6,
        tbps_triton=b / t_triton / 1e12, tbps_torch=b / t_torch / 1e12, tbps_copy=2 * half / t_copy / 1e12,
    )  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time tiles x division path")
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    args = ap.parse_args()
    if not triton_available():
        sys.exit("needs a CUDA GPU and triton")
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)  # fmt: skip
    rows = []
    for i, c in enumerate(CASES):
        if args.quick and i not in QUICK:
            continue
        rows.append(run_case(c, l2))
        print(f"  done {rows[-1]['name']}: {rows[-1]['tbps_triton']:.2f} TB/s", flush=True)
    sweep = []
    if args.sweep:
        for i in SWEEP_CASES:
            for (label, kw), tile in [(p, t) for p in SWEEP_PATHS for t in SWEEP_TILES]:
                if label != "fast" and tile not in ((8, 32, 4), (16, 32, 4)):
                    continue
                s = run_case(CASES[i], l2, tile=tile, kw=kw, with_torch=False)
                s["label"] = label
                sweep.append(s)
                print(f"  sweep {s['name']} {label} {tuple(tile)}: {s['tbps_triton']:.2f} TB/s", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels_nvfp4.json").write_text(json.dumps({"cases": rows, "sweep": sweep}, indent=1))

    hdr = (f"{'case':30} {'prod':>4} {'tile':>9} {'MB':>6} | {'triton us':>9} {'TB/s':>5} {'%copy':>5} | "
           f"{'torch us':>9} {'TB/s':>5} {'x':>5} | {'copy TB/s':>9} ok")  # fmt: skip
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['name']:30} {r['producer'][:2]:>4} {'/'.join(map(str, r['tile'])):>9} {r['bytes'] / 1e6:6.0f} | "
              f"{r['t_triton_us']:9.1f} {r['tbps_triton']:5.2f} {100 * r['tbps_triton'] / r['tbps_copy']:5.0f} | "
              f"{r['t_torch_us']:9.1f} {r['tbps_torch']:5.2f} {r['t_torch_us'] / r['t_triton_us']:5.1f} | "
              f"{r['tbps_copy']:9.2f} {'ok' if r['correct'] else 'BITS DIFFER'}")  # fmt: skip
    if sweep:
        print(f"\n{'sweep case':30} {'path':>9} {'tile':>9} {'us':>9} {'TB/s':>6} {'%copy':>6} ok")
        for s in sweep:
            print(f"{s['name']:30} {s['label']:>9} {'/'.join(map(str, s['tile'])):>9} {s['t_triton_us']:9.1f} "
                  f"{s['tbps_triton']:6.2f} {100 * s['tbps_triton'] / s['tbps_copy']:6.0f} "
                  f"{'ok' if s['correct'] else 'BITS DIFFER'}")  # fmt: skip
    if not all(r["correct"] for r in rows + sweep):
        sys.exit("some Triton results differ from nvfp4.py's torch path")


if __name__ == "__main__":
    main()
