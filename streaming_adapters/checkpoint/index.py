"""The source checkpoint, from headers only: which tensor lives in which file at which bytes.

A checkpoint is untrusted input.  Before any tensor byte is read, every file's header is checked as strictly
as ``safetensors`` does and more (``checkpoint/header.py``: exact length, contiguous coverage of the data
from 0 to the end of the file, no duplicate keys, bounded size and tensor count); a truncated download fails
here, naming the file and the first tensor that is cut off.  File names from ``model.safetensors.index.json``
must stay inside the checkpoint folder.

A tensor may also be stored in *pieces* across files: torch DCP's distributed HF save
(``HuggingFaceStorageWriter(save_distributed=True)``, torchtitan's HF save) writes each rank's shard to its
own file and records the shard's offsets in the full tensor in the header's ``__metadata__``
(``DCP_SHARDING_INFO``).  Such a tensor becomes one :class:`ShardedTensorInfo` whose pieces must tile the
full tensor exactly (no gap: a shard file is missing; no overlap: two saves mixed); only readers that read
piece by piece (the DCP reader) accept it (``allow_pieces=True``).

Memory: headers only (DeepSeek-V3: 163 files, ~92k entries, ~15 MB of JSON parsed once per rank).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import CheckpointError, CorruptCheckpointError
from . import files as _files
from .header import loads_json_file, parse_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODELOPT_CONFIG_NAME = "hf_quant_config.json"

# safetensors dtype string -> (torch dtype, bytes per element).  F8_E8M0 is here on purpose: DCP's own
# metadata read raises KeyError('F8_E8M0') on UE8M0 scales (formats.md §1.2).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_ITEMSIZES = {k: v[1] for k, v in DTYPES.items()}
FP8_WEIGHT_DTYPES = ("F8_E4M3",)
# config.json / the index: DeepSeek-V3's index (~92k entries) is ~8 MB; 256 MB means the file is not one.
_MAX_JSON_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: ``file`` is relative to the checkpoint folder, ``begin``/``end`` are absolute
    byte offsets in that file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_WEIGHT_DTYPES


@dataclass
class CheckpointIndex:
    """Headers of every safetensors file of a Hugging Face checkpoint folder, validated."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)
    modelopt_config: dict[str, Any] | None = None
    file_sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_pieces: bool = False) -> "CheckpointIndex":
        """Open and validate every header of the folder ``path``.  ``allow_pieces``: accept tensors saved
        in pieces across files (:class:`ShardedTensorInfo`); callers that read ``TensorInfo`` bytes whole
        (conversion) leave it off and get an error that says how to consolidate."""
        root = Path(path)
        if not root.is_dir():
            raise CorruptCheckpointError(
                "checkpoint path is not a folder",
                file=str(root),
                expected="a Hugging Face checkpoint folder (config.json + *.safetensors)",
                fix="pass the folder that holds the safetensors files",
            )
        root = root.resolve()
        config_path = _files.optional_file(root, CONFIG_NAME)  # a link outside the folder is refused
        config = _read_json(config_path) if config_path is not None else {}
        modelopt_path = _files.optional_file(root, MODELOPT_CONFIG_NAME)
        modelopt = _read_json(modelopt_path) if modelopt_path is not None else None
        weight_map = _weight_map(root)
        files = sorted(set(weight_map.values())) if weight_map is not None else _glob_files(root)
        if not files:
            raise CorruptCheckpointError(
                "no safetensors files in the checkpoint folder",
                file=str(root),
                expected="*.safetensors files (and model.safetensors.index.json if there are several)",
                fix="check the path; .bin/.pt checkpoints must be converted to safetensors first",
            )
        tensors: dict[str, TensorInfo] = {}
        pieces: dict[str, list[tuple[tuple[int, ...], TensorInfo]]] = {}
        sizes: dict[str, int] = {}
        for rel in files:
            full = _safe_join(root, rel, source=INDEX_NAME if weight_map is not None else "folder listing")
            if not full.is_file():
                raise CorruptCheckpointError(
                    "the index names a file that does not exist",
                    file=str(full),
                    tensor=_first_key_for(weight_map, rel),
                    expected=f"{rel} listed in {INDEX_NAME} to exist in {root}",
                    fix="re-download the checkpoint; the download is incomplete",
                )
            sizes[rel] = full.stat().st_size
            infos, meta = _parse_header(full, rel, sizes[rel])
            offsets = _dcp_sharding_info(full, infos, meta)
            for info in infos:
                if weight_map is not None and weight_map.get(info.name, rel) != rel:
                    continue  # the index says this name lives elsewhere; trust the index, like transformers
                if info.name in offsets:
                    pieces.setdefault(info.name, []).append((offsets[info.name], info))
                    continue
                if info.name in tensors:
                    raise CorruptCheckpointError(
                        "the same tensor is stored in two files",
                        file=f"{tensors[info.name].file} and {rel}",
                        tensor=info.name,
                        expected="each tensor name in exactly one file",
                        fix="add a model.safetensors.index.json that says which file holds it, or remove one copy",
                    )
                tensors[info.name] = info
        for name, parts in pieces.items():
            if name in tensors:
                raise CorruptCheckpointError(
                    "the same tensor is stored whole in one file and as a DCP shard in another",
                    file=f"{tensors[name].file} and {parts[0][1].file}", tensor=name,
                    expected="each tensor either whole in one file or in DCP_SHARDING_INFO pieces",
                    fix="the folder mixes two saves: keep one of them",
                )
            tensors[name] = _merge_pieces(root, name, parts, allow_pieces)
        if weight_map is not None:
            missing = [k for k in weight_map if k not in tensors]
            if missing:
                raise CorruptCheckpointError(
                    f"{len(missing)} tensor(s) listed in {INDEX_NAME} are not in the file the index names",
                    file=str(root / weight_map[missing[0]]),
                    tensor=missing[0],
                    expected=f"{missing[0]} in the header of {weight_map[missing[0]]} (examples={missing[:3]})",
                    fix="the index and the files disagree: re-download the checkpoint or regenerate the index",
                )
        return cls(path=root, tensors=tensors, config=config, modelopt_config=modelopt, file_sizes=sizes)

    # -- views -----------------------------------------------------------------------------------
    @property
    def quantization_config(self) -> dict[str, Any] | None:
        """``config.json``'s ``quantization_config``; for ModelOpt exports that only ship
        ``hf_quant_config.json``, a config built from that file (``quant_method: modelopt``)."""
        qc = self.config.get("quantization_config")
        if qc is None and isinstance(self.config.get("text_config"), Mapping):
            qc = self.config["text_config"].get("quantization_config")
        if qc is None and self.modelopt_config is not None:
            q = self.modelopt_config.get("quantization", {})
            if not isinstance(q, Mapping):
                raise CorruptCheckpointError(
                    f"hf_quant_config.json's quantization is a JSON {type(q).__name__}, not an object",
                    file=str(self.path / MODELOPT_CONFIG_NAME), tensor="quantization",
                    expected='{"quantization": {"quant_algo": "FP8", ...}}',
                    fix="repair or re-export hf_quant_config.json",
                )
            q = dict(q)
            q["quant_method"] = "modelopt"
            return q
        if qc is not None and not isinstance(qc, Mapping):
            raise CorruptCheckpointError(
                f"quantization_config is a JSON {type(qc).__name__}, not an object",
                file=str(self.path / CONFIG_NAME), tensor="quantization_config",
                expected='an object such as {"quant_method": "fp8", "weight_block_size": [128, 128]}',
                fix="repair config.json (remove quantization_config for a BF16 checkpoint)",
            )
        return qc

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def sharded(self) -> dict[str, "ShardedTensorInfo"]:
        """Tensors stored in pieces across files (torch DCP distributed save)."""
        return {k: v for k, v in self.tensors.items() if isinstance(v, ShardedTensorInfo)}

    def file_path(self, rel: str) -> Path:
        return self.path / rel

    @cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _read_json(path: Path) -> dict[str, Any]:
    data = loads_json_file(path, _MAX_JSON_BYTES)
    if not isinstance(data, dict):
        raise CorruptCheckpointError(
            "JSON file does not hold an object", file=str(path), expected="a JSON object",
            fix="re-download or repair the file",
        )
    return data


def _weight_map(root: Path) -> dict[str, str] | None:
    index_path = _files.optional_file(root, INDEX_NAME)
    if index_path is None:
        return None
    wm = _read_json(index_path).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CorruptCheckpointError(
            "index has no valid weight_map", file=str(index_path),
            expected='{"weight_map": {"<tensor>": "<file>.safetensors", ...}}',
            fix="regenerate the index, or delete it to let the folder's *.safetensors be read",
        )
    empty = next((k for k, v in wm.items() if not v.strip()), None)
    if empty is not None:
        raise CorruptCheckpointError(
            "index maps a tensor to an empty file name", file=str(index_path), tensor=empty,
            expected='"<tensor>": "<file>.safetensors"',
            fix="regenerate the index, or delete it to let the folder's *.safetensors be read",
        )
    # Two spellings of one shard (./f.safetensors, f.safetensors/) are one file: one key, one output file.
    return {k: _files.normalize_name(v, root=root, source=INDEX_NAME) for k, v in wm.items()}


def _glob_files(root: Path) -> list[str]:
    # Links count (the hub cache's snapshot files are links into blobs/); _safe_join checks where they go.
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".safetensors") and os.path.lexists(p))


def _safe_join(root: Path, rel: str, *, source: str) -> Path:
    """The checked path of checkpoint file ``rel``: normalised, resolved, inside the folder (or the hub
    cache's blobs/ of this repository), a regular file (checkpoint/files.py)."""
    rel = _files.normalize_name(rel, root=root, source=source)
    full = _files.resolve(root, rel, source=source)
    if os.path.exists(full):  # a missing file is named by the caller, with the tensor the index puts there
        _files.regular(root, rel, full)
    return full


def _first_key_for(weight_map: Mapping[str, str] | None, rel: str) -> str | None:
    if not weight_map:
        return None
    return next((k for k, v in weight_map.items() if v == rel), None)


def _parse_header(full: Path, rel: str, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """The validated entries of one file's header (rules: :mod:`.header`) and its ``__metadata__``."""
    _, entries, meta = parse_header(full, size, _ITEMSIZES)
    return [TensorInfo(name, rel, dtype, shape, begin, end) for name, dtype, shape, begin, end in entries], meta


# -- tensors in pieces (torch DCP distributed HF save) --------------------------------------------------
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY


@dataclass(frozen=True)
class ShardedTensorInfo(TensorInfo):
    """A tensor stored as pieces in several files.  ``shape`` is the full tensor's; ``file`` / ``begin`` /
    ``end`` are the first piece's and do not describe the whole: read it through ``pieces``, each the
    piece's offsets in the full tensor and the piece as stored (its own shape, file and bytes)."""

    pieces: tuple[tuple[tuple[int, ...], TensorInfo], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in self.pieces)


def _dcp_sharding_info(full: Path, infos: list[TensorInfo], meta: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Name -> offsets in the full tensor, from the header's ``__metadata__["DCP_SHARDING_INFO"]`` (a JSON
    string of ``{name: {"saved_offsets": [...]}}``, parsed with the header), or ``{}`` for a file without it."""
    text = meta.get(DCP_SHARDING_KEY)
    if text is None:
        return {}
    shapes = {i.name: i.shape for i in infos}
    try:
        info = json.loads(text)
        out = {name: tuple(entry["saved_offsets"]) for name, entry in info.items() if name in shapes}
    except (TypeError, KeyError, AttributeError, RecursionError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"__metadata__.{DCP_SHARDING_KEY} is not a JSON map of saved_offsets ({e!r})", file=str(full),
            expected='{"<tensor>": {"saved_offsets": [int, ...]}, ...}',
            fix="the file is damaged or not a torch DCP distributed save: re-save it",
        ) from None
    for name, offs in out.items():
        if len(offs) != len(shapes[name]) or not all(isinstance(o, int) and o >= 0 for o in offs):
            raise CorruptCheckpointError(
                f"saved_offsets {list(offs)} do not fit a tensor of {len(shapes[name])} dims",
                file=str(full), tensor=name, expected=f"{len(shapes[name])} non-negative ints",
                fix="the file is damaged or not a torch DCP distributed save: re-save it",
            )
    return out


def _merge_pieces(
    root: Path, name: str, parts: list[tuple[tuple[int, ...], TensorInfo]], allow_pieces: bool
) -> TensorInfo:
    """One tensor from its pieces: check they share a dtype and tile the full tensor (its shape is the
    pieces' bounding box, as torch's own reader computes it).  A single piece at offset 0 is a plain tensor."""
    files = sorted({p.file for _, p in parts})
    dtypes = {p.dtype for _, p in parts}
    if len(dtypes) != 1:
        raise CorruptCheckpointError(
            f"the pieces of a DCP-sharded tensor have different dtypes {sorted(dtypes)}",
            file=", ".join(files[:4]), tensor=name, expected="one dtype for every piece",
            fix="the folder mixes two saves: keep one of them",
        )
    shape = tuple(max(offs[d] + p.shape[d] for offs, p in parts) for d in range(len(parts[0][1].shape)))
    # Empty pieces (a rank that held 0 rows of an uneven shard) carry no bytes; dropping them keeps every
    # piece's offsets distinct, which DCP's metadata index needs.
    solid = [(o, p) for o, p in parts if p.numel > 0] or parts[:1]
    if len(solid) == 1 and not any(solid[0][0]) and solid[0][1].shape == shape:
        return solid[0][1]
    _check_tiling(name, shape, solid, files)
    if not allow_pieces:
        raise CheckpointError(
            f"the tensor is stored in {len(solid)} pieces across files (a torch DCP distributed save), and "
            "this operation reads whole tensors",
            file=str(root), tensor=name, expected="each tensor whole in one file",
            fix="load it with StreamingFP8StorageReader / load_fp8_state_dict (they read the pieces), or "
            "consolidate it first: HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True) "
            "or torch.distributed.checkpoint._consolidate_hf_safetensors.consolidate_safetensors_files",
        )
    solid.sort(key=lambda op: op[0])
    first = solid[0][1]
    return ShardedTensorInfo(name, first.file, first.dtype, shape, first.begin, first.end, tuple(solid))


def _check_tiling(name: str, shape: tuple[int, ...], parts, files: list[str]) -> None:
    """Pieces tile ``shape`` exactly: no two overlap and their volumes add up to the whole.  Vectorised
    over piece pairs (P^2 x ndim booleans; FSDP over 64 ranks is 4096 pairs per tensor)."""
    lo = torch.tensor([o for o, _ in parts], dtype=torch.int64).view(len(parts), len(shape))
    hi = lo + torch.tensor([p.shape for _, p in parts], dtype=torch.int64).view(len(parts), len(shape))
    overlap = ((lo[:, None] < hi[None]) & (lo[None] < hi[:, None])).all(-1)
    overlap.fill_diagonal_(False)
    covered = sum(p.numel for _, p in parts)
    if bool(overlap.any()) or covered != math.prod(shape):
        what = "overlap" if bool(overlap.any()) else f"cover {covered} of its {math.prod(shape)} elements"
        raise CorruptCheckpointError(
            f"the {len(parts)} DCP pieces of the tensor {what}",
            file=", ".join(files[:4]) + (" ..." if len(files) > 4 else ""), tensor=name,
            expected=f"pieces that tile the full shape {list(shape)} exactly",
            fix="a shard file is missing or the folder mixes two saves: copy every shard-*.safetensors of one "
            "save into the folder",
        )
