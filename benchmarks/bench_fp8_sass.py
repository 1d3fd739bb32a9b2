"""Compile the Triton FP8 dequant kernel for sm_90 on any machine (no GPU: Triton's bundled ptxas and
cuobjdump) and print what each variant's SASS does: registers, shared memory, instruction count, and the
width of its global loads / stores.  Costs no device time.

    python benchmarks/bench_fp8_sass.py            # the table
    python benchmarks/bench_fp8_sass.py --dump DIR # also write each variant's .ptx / .sass

Expected for the default BF16 variant (64x128 tile, 4 warps, aligned): ~60 registers, no shared memory,
LDG.E.EF.64 for codes, STG.E.128 for the output.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from streaming_adapters.numerics import triton_fp8  # noqa: E402

_INTS = ["rows", "cols_u", "out_stride_u", "codes_stride_u", "r0", "c0", "bm", "bn", "wr0", "wc0", "gr", "gc",
         "n_col_tiles"]  # fmt: skip
_OUT = {0: ("*bf16", 8), 1: ("*fp16", 8), 2: ("*fp32", 4)}

# (label, BLOCK_R, BLOCK_C, warps, ROW_WIDE, COL_WIDE, OUT_KIND, SOFT, aligned, codes_vec or None)
VARIANTS = [
    ("bf16 blk128 default", 64, 128, 4, True, True, 0, False, True, None),
    ("bf16 blk128 16B code loads", 64, 128, 4, True, True, 0, False, True, 16),
    ("bf16 per-channel", 64, 128, 4, False, True, 0, False, True, None),
    ("bf16 group32 (256x32)", 256, 32, 4, False, True, 0, False, True, None),
    ("bf16 blk128, BC=256 tile", 64, 256, 4, True, False, 0, False, True, None),
    ("bf16 7x5 gather (32x64)", 32, 64, 4, False, False, 0, False, True, None),
    ("bf16 unaligned (16x128)", 16, 128, 4, True, True, 0, False, False, None),
    ("bf16 SOFT (sm<89/interp)", 64, 128, 4, True, True, 0, True, True, None),
    ("fp16 blk128", 64, 128, 4, True, True, 1, False, True, None),
    ("fp32 blk128", 64, 128, 4, True, True, 2, False, True, None),
]


def compile_variant(br, bc, nw, row_wide, col_wide, out_kind, soft, aligned, codes_vec, cap=90):
    kern = triton.jit(triton_fp8._dequant_fp8_kernel)
    out_ty, vec = _OUT[out_kind]
    cv = codes_vec or vec
    sig = {"out_ptr": out_ty, "codes_ptr": "*u8", "scale_ptr": "*fp32", **{n: "i32" for n in _INTS}}
    consts = dict(BLOCK_R=br, BLOCK_C=bc, ROW_WIDE=row_wide, COL_WIDE=col_wide, OUT_KIND=out_kind, SOFT=soft,
                  VEC=vec, CODES_VEC=cv, UNIT=vec if aligned else 1, CODES_UNIT=cv if aligned else 1)  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    ptrs = ["out_ptr", "codes_ptr", "scale_ptr"] if aligned else ["scale_ptr"]
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = triton.compiler.ASTSource(fn=kern, constexprs=consts, signature=sig, attrs=attrs)
    target = GPUTarget("cuda", cap, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": nw})
    return triton.compile(src, target=target, options=opts.__dict__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=Path, help="write .ptx / .sass per variant here")
    args = ap.parse_args()
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    print(f"{'variant':28} {'regs':>4} {'smem':>5} {'instrs':>6} {'/elem':>5}  memory ops")
    for label, br, bc, nw, *rest in VARIANTS:
        cc = compile_variant(br, bc, nw, *rest)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            Path(cubin).write_bytes(cc.asm["cubin"])
            sass = subprocess.run([tools / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True).stdout
            res = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                                 text=True).stdout  # fmt: skip
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
        mem = collections.Counter(o for o in ops if o.startswith(("LDG", "STG", "LDS", "STS", "BAR")))
        regs = re.search(r"REG:(\d+)", res).group(1)
        smem = re.search(r"SHARED:(\d+)", res).group(1)
        per_elem = len(ops) / (br * bc / (32 * nw))
        print(f"{label:28} {regs:>4} {smem:>5} {len(ops):6d} {per_elem:5.1f}  "
              + " ".join(f"{k}x{v}" for k, v in sorted(mem.items())))  # fmt: skip
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            (args.dump / f"{stem}.ptx").write_text(cc.asm["ptx"])
            (args.dump / f"{stem}.sass").write_text(sass)


if __name__ == "__main__":
    main()
