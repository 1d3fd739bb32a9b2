"""Checks a W4A4 (NVFP4, calibrated input scales) output written by the Slurm jobs.

    python tests/slurm/check_w4a4.py OUT W4A16 REPORT WORLD

- every NVFP4 Linear of OUT (one ``weight_global_scale`` / ``weight_scale_2``) has an input scale, and every
  input scale is finite and > 0;
- the scales are equal inside each group of Linears that read the same input (q/k/v, gate/up, q_a/kv_a,
  w1/w3): a runtime that fuses the group quantizes its input once, with one scale;
- every tensor of the weight-only output W4A16 of the same checkpoint is in OUT, byte for byte (calibration
  adds input scales and changes no weight);
- REPORT (the run's report.json) says WORLD ranks took part and calibration ran.
Exit status 1 with one line per problem, else one summary line.  Independent of the project's own
verify_checkpoint (which checks the same rules): this file reads the safetensors headers and bytes itself.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

# Linears that read one input: (member suffixes); the module path before the suffix must match too.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
          ("w1", "w3"))
INPUT_SCALE = (".input_global_scale", ".input_scale")  # compressed-tensors, ModelOpt
GLOBAL_SCALE = (".weight_global_scale", ".weight_scale_2")


def read_folder(folder: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) for every tensor of every .safetensors file (format: 8-byte header size,
    JSON header, data; offsets relative to the data's start)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                out[name] = (info["dtype"], raw[8 + n + a:8 + n + b])
    return out


def as_floats(dtype: str, data: bytes) -> list[float]:
    assert dtype == "F32", dtype  # both formats store input scales as float32
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def main(out: Path, w4a16: Path, report: Path, world: int) -> list[str]:
    problems = []
    got, ref = read_folder(out), read_folder(w4a16)
    linears = {k[: -len(s)] for k in got for s in GLOBAL_SCALE if k.endswith(s)}
    scales = {}
    for k, (dtype, data) in got.items():
        for s in INPUT_SCALE:
            if k.endswith(s):
                scales[k[: -len(s)]] = as_floats(dtype, data)
    if not linears:
        problems.append(f"{out}: no NVFP4 Linear (no weight global scale)")
    for mod in sorted(linears - set(scales)):
        problems.append(f"{mod}: no input scale")
    for mod, v in sorted(scales.items()):
        if len(v) != 1 or not math.isfinite(v[0]) or v[0] <= 0:
            problems.append(f"{mod}: input scale {v} is not one finite positive number")
    groups = 0
    for members in GROUPS:
        for mod in sorted(scales):
            parent, _, leaf = mod.rpartition(".")
            if leaf != members[0]:
                continue
            vals = {m: scales.get(f"{parent}.{m}") for m in members}
            groups += 1
            if len({tuple(v) if v else None for v in vals.values()}) != 1:
                problems.append(f"{parent}: input scales differ inside {members}: {vals}")
    for k, v in sorted(ref.items()):
        if got.get(k) != v:
            problems.append(f"{k}: {'missing' if k not in got else 'differs from'} the W4A16 output's tensor")
    r = json.loads(report.read_text())
    if r.get("world_size") != world or len(r.get("ranks", [])) != world:
        problems.append(f"{report}: world_size {r.get('world_size')}, {len(r.get('ranks', []))} ranks, want {world}")
    if not (r.get("calibration") or {}).get("tokens_sha256"):
        problems.append(f"{report}: no calibration section with the tokens' sha256")
    if not problems:
        print(f"W4A4 ok: {len(scales)} input scales finite and > 0 ({min(v[0] for v in scales.values()):g} .. "
              f"{max(v[0] for v in scales.values()):g}), {groups} input-sharing groups equal, {len(ref)} W4A16 "
              f"tensors byte-identical; world size {world}")
    return problems


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1])
    found = main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    for p in found:
        print("W4A4 check:", p)
    sys.exit(1 if found else 0)
