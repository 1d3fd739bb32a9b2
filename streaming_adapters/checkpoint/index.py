"""The source checkpoint, from headers only: which tensor lives in which file at which bytes.

A checkpoint is untrusted input.  Before any tensor byte is read, every file's header is checked as strictly
as ``safetensors`` does and more (``checkpoint/header.py``: exact length, contiguous coverage of the data
from 0 to the end of the file, no duplicate keys, bounded size and tensor count); a truncated download fails
here, naming the file and the first tensor that is cut off.  File names from ``model.safetensors.index.json``
must stay inside the checkpoint folder.

Memory: headers only (DeepSeek-V3: 163 files, ~92k entries, ~15 MB of JSON parsed once per rank).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import CorruptCheckpointError, UnsafePathError
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
    def open(cls, path: str | os.PathLike) -> "CheckpointIndex":
        root = Path(path)
        if not root.is_dir():
            raise CorruptCheckpointError(
                "checkpoint path is not a folder",
                file=str(root),
                expected="a Hugging Face checkpoint folder (config.json + *.safetensors)",
                fix="pass the folder that holds the safetensors files",
            )
        root = root.resolve()
        config = _read_json(root / CONFIG_NAME) if (root / CONFIG_NAME).exists() else {}
        modelopt = (
            _read_json(root / MODELOPT_CONFIG_NAME) if (root / MODELOPT_CONFIG_NAME).exists() else None
        )
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
            for info in _parse_header(full, rel, sizes[rel]):
                if weight_map is not None and weight_map.get(info.name, rel) != rel:
                    continue  # the index says this name lives elsewhere; trust the index, like transformers
                if info.name in tensors:
                    raise CorruptCheckpointError(
                        "the same tensor is stored in two files",
                        file=f"{tensors[info.name].file} and {rel}",
                        tensor=info.name,
                        expected="each tensor name in exactly one file",
                        fix="add a model.safetensors.index.json that says which file holds it, or remove one copy",
                    )
                tensors[info.name] = info
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
    index_path = root / INDEX_NAME
    if not index_path.exists():
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
    return wm


def _glob_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".safetensors") and p.is_file())


def _safe_join(root: Path, rel: str, *, source: str) -> Path:
    """Refuse names that leave the checkpoint folder: absolute paths, '..', or links pointing out."""
    bad = os.path.isabs(rel) or any(part == ".." for part in Path(rel).parts) or "\x00" in rel
    full = (root / rel).resolve() if not bad else None
    if bad or (full is not None and root not in full.parents):
        raise UnsafePathError(
            "a file name points outside the checkpoint folder",
            file=rel,
            expected=f"a relative name inside {root} (named by {source})",
            fix="do not load this checkpoint as it is; a checkpoint is untrusted input. Fix the index "
            "or move the files into the folder",
        )
    return full


def _first_key_for(weight_map: Mapping[str, str] | None, rel: str) -> str | None:
    if not weight_map:
        return None
    return next((k for k, v in weight_map.items() if v == rel), None)


def _parse_header(full: Path, rel: str, size: int) -> list[TensorInfo]:
    """The validated entries of one file's header (rules: :mod:`.header`)."""
    _, entries = parse_header(full, size, _ITEMSIZES)
    return [TensorInfo(name, rel, dtype, shape, begin, end) for name, dtype, shape, begin, end in entries]
