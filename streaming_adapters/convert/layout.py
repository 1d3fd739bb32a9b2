"""Output files laid out before any tensor exists, so every rank can ``pwrite`` its rows in place.

A safetensors file is an 8-byte header length, a JSON header and the tensors' bytes at offsets the header
names.  Because output shapes and dtypes are known from the plan, each file's header -- and therefore
every tensor's byte range -- is computed up front; ranks then write disjoint row ranges with
``os.pwrite`` and no rank ever holds a whole file.  safetensors itself has no API for writing one file
from several processes, so the header is built here, in exactly the order and padding
``safetensors.torch.save_file`` uses (a test checks the bytes against it): tensors sorted by dtype
(descending, in safetensors' enum order) then name, header padded with spaces to a multiple of 8.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from ..formats.outputs.base import OutputTensor  # noqa: F401 -- the targets that name outputs own it

# safetensors' Dtype enum order (safetensors/src/tensor.rs); save_file sorts by it, largest first.
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class FileLayout:
    name: str
    header: bytes                         # 8-byte length + JSON + padding
    offsets: dict[str, tuple[int, int]]   # tensor -> absolute [begin, end) in the file
    size: int


def layout_file(name: str, tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> FileLayout:
    order = sorted(tensors, key=lambda t: (-_DTYPE_ORDER.index(t.dtype), t.name))
    header: dict = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    pos = 0
    rel: dict[str, tuple[int, int]] = {}
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        rel[t.name] = (pos, pos + t.nbytes)
        pos += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    start = len(head)
    return FileLayout(name, head, {k: (start + a, start + b) for k, (a, b) in rel.items()}, start + pos)
