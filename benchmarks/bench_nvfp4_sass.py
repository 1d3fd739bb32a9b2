"""Compile the Triton NVFP4 quantization kernel for sm_90 on any machine (no GPU: Triton's bundled ptxas and
cuobjdump) and print what each variant's SASS does: registers, shared memory, spills, instruction counts and
the width of its global loads / stores.  Costs no device time.

    python benchmarks/bench_nvfp4_sass.py            # the table
    python benchmarks/bench_nvfp4_sass.py --dump DIR # also write each variant's .ttgir / .ptx / .sass

Columns: ``static/el`` = all SASS instructions / elements per thread (both division paths, the div_rn slow
path subroutine included); ``exec/el`` = instructions on the path a normal call executes (the kernel rebuilt
with only the fast division branch; for ``fast=False`` the kernel itself), div_rn slow-path calls (taken only
for denormal / huge operands) skipped, per element.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from streaming_adapters.numerics import triton_nvfp4  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# (label, BLOCK_R, BLOCK_G, warps, PRODUCER, SOFT, FAST, aligned)
VARIANTS = [
    ("ct default", *triton_nvfp4.DEFAULT_TILE, 0, False, True, True),
    ("modelopt default", *triton_nvfp4.DEFAULT_TILE, 1, False, True, True),
    ("ct 4x32 w4", 4, 32, 4, 0, False, True, True),
    ("ct 8x32 w4", 8, 32, 4, 0, False, True, True),
    ("ct 16x32 w4", 16, 32, 4, 0, False, True, True),
    ("ct 32x32 w8", 32, 32, 8, 0, False, True, True),
    ("ct 16x64 w8", 16, 64, 8, 0, False, True, True),
    ("ct K=16 tile 128x2", 128, 2, 4, 0, False, True, True),
    ("ct one long row 1x256", 1, 256, 4, 0, False, True, True),
    ("ct div_rn only (fast=False)", *triton_nvfp4.DEFAULT_TILE, 0, False, False, True),
    ("ct SOFT (sm<89 / interp)", *triton_nvfp4.DEFAULT_TILE, 0, True, True, True),
    ("ct unaligned base/stride", *triton_nvfp4.DEFAULT_TILE, 0, False, True, False),
]


def _fast_only_module():
    """triton_nvfp4 with the runtime branch between the two division paths removed (fast path only)."""
    src = Path(triton_nvfp4.__file__).read_text()
    old = "for P in tl.static_range(2 if FAST else 1):"
    assert old in src
    tmp = Path(tempfile.mkdtemp()) / "triton_nvfp4_fast_only.py"
    tmp.write_text(src.replace(old, "for P in tl.static_range(1, 2):"))
    spec = importlib.util.spec_from_file_location("triton_nvfp4_fast_only", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_variant(mod, br, bg, nw, producer, soft, fast, aligned, cap=90):
    kern = triton.jit(mod._quant_nvfp4_kernel)
    sig = {"packed_ptr": "*u8", "scale_ptr": "*u8", "w_ptr": "*i32", "gscale_ptr": "*fp32",
           **{n: "i32" for n in mod._NO_SPECIALIZE}}  # fmt: skip
    consts = dict(BLOCK_R=br, BLOCK_G=bg, PRODUCER=producer, SOFT=soft, FAST=fast, UNIT=4 if aligned else 1)
    sig.update({k: "constexpr" for k in consts})
    ptrs = ["packed_ptr", "scale_ptr", "gscale_ptr"] + (["w_ptr"] if aligned else [])
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = triton.compiler.ASTSource(fn=kern, constexprs=consts, signature=sig, attrs=attrs)
    target = GPUTarget("cuda", cap, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": nw})
    return triton.compile(src, target=target, options=opts.__dict__)


def sass_of(cc):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(cc.asm["cubin"])
        sass = subprocess.run([TOOLS / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True).stdout
        res = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                             text=True).stdout  # fmt: skip
    return sass, res


def _instructions(sass):
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass):
        out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def executed_count(sass):
    """Instructions from entry to the last EXIT, skipping each ``@P BRA`` over a block that CALLs the div_rn
    slow path (not taken for normal operands), NOPs excluded.  Straight-line kernel: this is what runs."""
    ins = _instructions(sass)
    where = {a: i for i, (a, _) in enumerate(ins)}
    last = max(i for i, (_, t) in enumerate(ins) if re.search(r"\bEXIT\b", t))
    i = n = 0
    while i <= last:
        t = ins[i][1]
        m = re.match(r"@!?U?P\w+\s+BRA\s+(?:\S*?)0x([0-9a-f]+)", t)
        if m:
            j = where.get(int(m.group(1), 16))
            if j is not None and j > i and any("CALL" in ins[k][1] for k in range(i, j)):
                n, i = n + 1, j
                continue
        n += not t.startswith("NOP")
        i += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=Path, help="write .ttgir / .ptx / .sass per variant here")
    args = ap.parse_args()
    fast_mod = _fast_only_module()
    print(f"{'variant':28} {'tile':>9} {'regs':>4} {'smem':>4} {'spill':>5} {'static/el':>9} {'exec/el':>7}  "
          "memory ops (static)")
    for label, br, bg, nw, *rest in VARIANTS:
        cc = compile_variant(triton_nvfp4, br, bg, nw, *rest)
        sass, res = sass_of(cc)
        # executed instructions: the fast branch alone (FAST) or the kernel itself (div_rn only: one path)
        fast_sass = sass_of(compile_variant(fast_mod, br, bg, nw, *rest))[0] if rest[2] else sass
        ops = [t.split()[1] if t.startswith("@") else t.split()[0] for _, t in _instructions(sass)]
        mem = collections.Counter(o for o in ops if o.startswith(("LDG", "STG", "LDS", "STS", "BAR", "LDL", "STL")))
        regs = re.search(r"REG:(\d+)", res).group(1)
        smem = re.search(r"SHARED:(\d+)", res).group(1)
        spill = int(re.search(r"STACK:(\d+)", res).group(1)) + int(re.search(r"LOCAL:(\d+)", res).group(1))
        per_thread = br * bg * 16 / (32 * nw)
        static = sum(1 for o in ops if not o.startswith("NOP")) / per_thread
        fast = executed_count(fast_sass) / per_thread
        print(f"{label:28} {f'{br}x{bg}/{nw}':>9} {regs:>4} {smem:>4} {spill:5d} {static:9.1f} {fast:7.1f}  "
              + " ".join(f"{k}x{v}" for k, v in sorted(mem.items())))  # fmt: skip
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            for ext in ("ttgir", "ptx"):
                (args.dump / f"{stem}.{ext}").write_text(cc.asm[ext])
            (args.dump / f"{stem}.sass").write_text(sass)
            (args.dump / f"{stem}.fast_only.sass").write_text(fast_sass)


if __name__ == "__main__":
    main()
