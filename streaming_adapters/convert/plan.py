"""Plan a conversion from headers alone: output files and byte ranges, amax groups, steps, row pieces.

* **Units.**  NVFP4 weights that must share one global scale form a unit (formats.md §2.3:
  q/k/v, gate/up, DeepSeek q_a/kv_a, per-expert gate/up or w1/w3); every other tensor is a unit alone.
* **Steps.**  Units in checkpoint order are packed into steps of at most ``step_bytes`` of BF16 (a
  fused unit is never split across steps).  Steps do not depend on the world size, so a run resumed on
  a different number of ranks reuses the finished steps.
* **Pieces.**  Within a step each tensor goes to one rank, or -- when it is large -- is split into row
  ranges over all ranks, so ranks read disjoint bytes and the step's work is balanced.
* **Files.**  Output tensors stay in the file of their source weight (same file names), each file's
  header computed in advance (``layout.py``), so the output bytes never depend on the world size or the
  split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from ..checkpoint.index import CheckpointIndex
from ..errors import AlreadyNVFP4Error, CheckpointError
from ..formats import LogicalTensor, StreamingFP8StateDictAdapter
from ..models.families import LEAF_GROUPS, Family, get_family
from ..formats.ignore import compile_patterns
from .layout import FileLayout, OutputTensor, layout_file
from ..formats.outputs import OutputTarget, get_target, is_linear_weight, resolve_target

# Deprecated: the bare leaf names the fused groups were once matched by, anywhere in a name.  The groups now live
# with each model family (``models/families.py``: ``Family.fused``, paths relative to a decoder layer).
FUSED_MEMBERS = LEAF_GROUPS
# Written by the conversion next to the shards (and its bookkeeping folder, a dot-folder).
_RESERVED = frozenset({"model.safetensors.index.json", "config.json", "hf_quant_config.json"})
# 1 GiB of BF16 per step: a Llama-70B decoder layer (1.7 GB BF16) is two steps; per rank at world 8 a step
# holds 128 MiB, well inside the "one group's share + 256 MiB" memory bar.
DEFAULT_STEP_BYTES = 1 << 30


@dataclass(frozen=True)
class Piece:
    tensor: str
    r0: int
    r1: int


@dataclass
class Step:
    index: int
    units: list[list[str]]                   # amax units (tensor names); nvfp4 units first
    pieces: dict[int, list[Piece]] = field(default_factory=dict)

    def nvfp4_units(self, plan: "ConversionPlan") -> list[list[str]]:
        return [u for u in self.units if plan.nvfp4[u[0]]]


@dataclass
class ConversionPlan:
    source: str
    target: str
    format: str | None
    logical: dict[str, LogicalTensor]
    nvfp4: dict[str, bool]                   # logical tensor -> quantized to NVFP4
    outputs: dict[str, list[OutputTensor]]   # logical tensor -> its output tensors
    files: dict[str, FileLayout]
    file_of: dict[str, str]                  # output tensor -> file
    steps: list[Step]
    ignore: list[str]
    fingerprint: str                         # options + layout: a resume must match it
    source_fingerprint: str = ""             # the source files' identity and content sample (see below)
    calibration: dict | None = None          # W4A4: {"tokens_sha256", "moe_all_experts", "attention"}
    input_amax: dict[str, float] = field(default_factory=dict)  # W4A4: module -> calibrated input amax

    @property
    def output_target(self) -> OutputTarget:
        """The output format object (formats/outputs): names, scales, quantizes and writes config."""
        return get_target(self.format or self.target)

    @property
    def w4a4(self) -> bool:
        return self.calibration is not None

    def location(self, out: OutputTensor) -> tuple[str, int, int]:
        f = self.file_of[out.name]
        b, e = self.files[f].offsets[out.name]
        return f, b, e

    @property
    def total_output_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def unit_key(name: str, family: Family | None = None) -> tuple[str, int] | None:
    """``(parent module, group)`` of a weight in one of the family's fused groups (default: any known group)."""
    return (family or get_family()).fused_group(name)


_unit_key = unit_key  # the earlier private name


def _layer_key(name: str, family: Family | None = None) -> tuple:
    """Embeddings first, decoder layers by index, the rest last."""
    layer = (family or get_family()).layer_of(name)
    return (0 if "embed" in name else 2 if layer is None else 1, layer[1] if layer else 0)


def make_plan(
    index: CheckpointIndex,
    adapter: StreamingFP8StateDictAdapter,
    target: str,
    fmt: str | None,
    world_size: int,
    *,
    step_bytes: int = DEFAULT_STEP_BYTES,
    ignore: list[str] | tuple[str, ...] = (),
    calibration: dict | None = None,
) -> ConversionPlan:
    """``calibration`` (nvfp4 only): W4A4, every NVFP4 Linear gets an input-scale output; the dict (tokens'
    sha256, MoE rule) enters the fingerprint and the tokens' sha256 the files' metadata."""
    out = resolve_target(target, fmt)
    target, fmt = out.target, out.format
    w4a4 = calibration is not None and out.quantizes
    logical = dict(adapter.plan.logical)
    if out.quantizes and adapter.layout == "nvfp4":
        raise AlreadyNVFP4Error(
            f"the checkpoint is already NVFP4 ({adapter.name}): converting it to NVFP4 again would quantize "
            "its decoded BF16 weights a second time",
            file=str(index.path), expected="an FP8 (or BF16) checkpoint as the source of target='nvfp4'",
            fix="use it as it is; to change its NVFP4 format or get BF16, convert it with target='bf16' "
            "(recipe dequantize_bf16) and quantize that",
        )
    user_ignore = list(ignore)
    # compressed-tensors' syntax (exact module / tensor names, 're:' regexes); fnmatch globs still work, warned.
    ignored = compile_patterns(user_ignore, where="ignore (output.ignore)", legacy="glob")

    nvfp4: dict[str, bool] = {}
    ignore_list: set[str] = set()
    for name, lt in logical.items():
        if out.quantizes and lt.scale is not None and len(lt.shape) > 2:
            # Fused FP8 experts [E, N, K] (transformers 5 / Mistral-4): NVFP4 readers (vLLM's expert mapping,
            # TensorRT-LLM) want per-expert tensors (formats.md 2.4); writing them fused in BF16 beside an
            # NVFP4 config would give a checkpoint no reader loads.
            raise CheckpointError(
                f"FP8 fused experts {list(lt.shape)} cannot be written as NVFP4 per-expert tensors yet",
                file=str(index.file_path(lt.stored.file)), tensor=name,
                expected="per-expert FP8 weights (experts.{e}.gate_proj.weight ...) for an NVFP4 target",
                fix="convert with target=bf16 (fused experts are dequantized bit-exactly), or load the model "
                "with transformers and save_pretrained it (it writes experts per expert) first",
            )
        q = out.quantizes and out.can_quantize(lt) and not ignored.matches(name[: -len(".weight")], name)
        nvfp4[name] = q
        if out.quantizes and is_linear_weight(lt) and not q:
            ignore_list.add(name[: -len(".weight")])
    outputs = {n: out.outputs_for(lt, nvfp4[n], w4a4) for n, lt in logical.items()}

    # Files: mirror the source files.
    per_file: dict[str, list[OutputTensor]] = {}
    file_of: dict[str, str] = {}
    for n, outs in outputs.items():
        f = logical[n].stored.file
        for o in outs:
            per_file.setdefault(f, []).append(o)
            file_of[o.name] = f
    if len(file_of) != sum(len(v) for v in outputs.values()):
        raise CheckpointError("two source tensors map to the same output name", file=str(index.path),
                              expected="unique output names", fix="report this checkpoint layout as a bug")
    for f in per_file:  # names are normalised by the index (checkpoint/files.py); these would be overwritten
        if f in _RESERVED or any(part.startswith(".") for part in f.split("/")):
            raise CheckpointError(
                f"a shard's name {f!r} is one the converted output needs for itself", file=str(index.path / f),
                expected=f"a shard name other than {sorted(_RESERVED)} and not starting with '.'",
                fix="rename the shard (and its entries in model.safetensors.index.json)")
    meta = {"format": "pt", "calibration_tokens_sha256": calibration["tokens_sha256"]} if w4a4 else None
    files = {f: layout_file(f, ts, meta) for f, ts in sorted(per_file.items())}

    # Units, in checkpoint (layer) order.
    family = get_family(index.config)
    order = sorted(logical, key=lambda n: (_layer_key(n, family), n))
    units: dict[tuple, list[str]] = {}
    for n in order:
        key = unit_key(n, family) if nvfp4[n] else None
        units.setdefault(key if key is not None else ("single", n), []).append(n)

    # Steps by BF16 bytes, never splitting a unit.
    steps: list[Step] = []
    cur: list[list[str]] = []
    cur_bytes = 0
    for unit in units.values():
        b = sum(_bf16_bytes(logical[n]) for n in unit)
        if cur and cur_bytes + b > step_bytes:
            steps.append(Step(len(steps), cur))
            cur, cur_bytes = [], 0
        cur.append(unit)
        cur_bytes += b
    if cur:
        steps.append(Step(len(steps), cur))
    for step in steps:
        step.units.sort(key=lambda u: not nvfp4[u[0]])  # stable: amax vector order = nvfp4 units first
        step.pieces = _assign(step, logical, world_size)

    fp = _fingerprint(index, target, fmt, user_ignore, step_bytes, calibration if w4a4 else None)
    return ConversionPlan(str(index.path), target, fmt, logical, nvfp4, outputs, files, file_of, steps,
                          sorted(ignore_list), fp,  # source_fingerprint: set on rank 0 only (it reads)
                          calibration=calibration if w4a4 else None)


def _bf16_bytes(lt: LogicalTensor) -> int:
    n = 1
    for d in lt.shape:
        n *= d
    return n * (2 if lt.scale is not None else lt.stored.itemsize)


def _assign(step: Step, logical: dict[str, LogicalTensor], world: int) -> dict[int, list[Piece]]:
    """Greedy balance: tensors larger than half a rank's share are split by rows over every rank
    (split points on scale-block rows where possible, so ranks read disjoint scale rows too); the rest
    go whole to the least-loaded rank, largest first."""
    names = [n for u in step.units for n in u]
    sizes = {n: _bf16_bytes(logical[n]) for n in names}
    share = sum(sizes.values()) / world
    load = [0.0] * world
    pieces: dict[int, list[Piece]] = {r: [] for r in range(world)}
    for n in sorted(names, key=lambda x: (-sizes[x], x)):
        lt = logical[n]
        rows = lt.shape[0] if lt.shape else 1
        if world > 1 and sizes[n] > share / 2 and rows >= world:
            align = lt.scale.block[0] if lt.scale is not None and lt.scale.block[0] < rows else 1
            bounds = _split_rows(rows, world, align)
            for r, (a, b) in enumerate(bounds):
                if b > a:
                    pieces[r].append(Piece(n, a, b))
                    load[r] += sizes[n] * (b - a) / rows
        else:
            r = min(range(world), key=lambda i: (load[i], i))
            pieces[r].append(Piece(n, 0, rows))
            load[r] += sizes[n]
    return pieces


def _split_rows(rows: int, world: int, align: int) -> list[tuple[int, int]]:
    blocks = -(-rows // align)
    if blocks < world:
        align, blocks = 1, rows
    cuts = [min(rows, (blocks * r // world) * align) for r in range(world + 1)]
    cuts[-1] = rows
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def _fingerprint(index: CheckpointIndex, target: str, fmt: str | None, ignore: list[str], step_bytes: int,
                 calibration: dict | None = None) -> str:
    h = hashlib.sha256()
    # W4A16 keeps its old fingerprint (a resumed W4A16 run from before W4A4 existed still matches).
    h.update(json.dumps([target, fmt, ignore, step_bytes] + ([calibration] if calibration else []),
                        sort_keys=True).encode())
    for rel, size in sorted(index.file_sizes.items()):
        h.update(f"{rel}:{size}".encode())
    for name, t in sorted(index.tensors.items()):
        h.update(f"{name}:{t.file}:{t.dtype}:{t.shape}:{t.begin}".encode())
    h.update(json.dumps(index.config, sort_keys=True, default=str).encode())
    return h.hexdigest()


# Bytes hashed at the end of each file: the last tensor's tail (a re-quantized revision of the same layout
# changes it).  64 KiB: one read per file, ~1 ms warm (docs/architecture.md "Resume fingerprint").
_TAIL_SAMPLE = 64 * 1024


def source_fingerprint(index: CheckpointIndex) -> str:
    """What identifies the source's *content* at resume time: per file its size, mtime_ns and inode (a
    download or copy of another revision gets new ones), a sha256 of its whole header and of its last
    64 KiB.  Inodes are kept but not device numbers: those differ between the NFS clients of one file."""
    h = hashlib.sha256()
    for rel in sorted(index.file_sizes):
        path = index.file_path(rel)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(n, st.st_size)))  # the header was validated: n fits the file
            f.seek(max(0, st.st_size - _TAIL_SAMPLE))
            h.update(f.read(_TAIL_SAMPLE))
    return h.hexdigest()
