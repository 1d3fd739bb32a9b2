"""A safetensors header, parsed as untrusted input: as strict as ``safetensors`` (Rust), then stricter.

The rules, all checked before any tensor byte is read or any buffer is sized from the header:

* the 8-byte length ``n`` leaves room in the file and is at most :data:`MAX_HEADER_BYTES`; the header is
  UTF-8 (not UTF-16/32, which ``json.loads(bytes)`` would silently accept), is one JSON
  object followed only by JSON whitespace (writers pad with spaces);
* no duplicate key in any JSON object (``{"w": A, "w": B}`` would let one tensor take another's bytes);
  no ``NaN``/``Infinity`` constants, no integer over 4300 digits, no nesting deep enough to overflow the parser
  (each is a named error, never a raw ``RecursionError`` / ``ValueError``);
* at most :data:`MAX_TENSORS_PER_FILE` entries, each exactly ``{"dtype", "shape", "data_offsets"}`` with a known
  dtype, at most :data:`MAX_NDIM` integer dims in ``[0, 2**63)`` (what Rust's ``usize`` parses; so a shape's
  product has at most 1008 bits and never overflows anything), ``end - begin == numel * itemsize``;
* the data region starts at ``8 + n`` and the tensors cover ``[0, size - 8 - n)`` exactly: sorted by offset,
  each starts where the previous one ended, from 0, and the last one ends at the end of the file.  This is
  what ``safetensors`` enforces (``MetadataIncompleteBuffer`` / ``InvalidOffset``): a header length a few bytes
  short, ending inside the space padding, still parses as JSON but leaves a gap or trailing bytes, and is
  refused here instead of reading every tensor shifted;
* ``__metadata__``, if present, maps strings to strings (as ``safetensors`` requires); names are valid
  Unicode (a ``"\\ud800"`` escape is refused: the name could not be written back).

Memory and time: the raw header (at most 64 MiB) plus its parsed objects, bounded before ``json.loads`` by
byte counts (see :func:`parse_header`).  Measured on the 2-core CI machine under a load average of ~14 (six
jobs sharing it; idle is several times faster): a header of the maximum 262144 tensors (21.6 MB) parses in
9.1 s (json.loads with the duplicate-key hook; 6.6 s without it) + 0.6 s of checks, +250 MB RSS; the 60.9 MB,
900,000-tensor header that used to take GBs and over a minute is refused before ``json.loads`` in 0.47 s,
+60 MB (the raw bytes), and a 1,000,000-tensor one (67.7 MB) by its length alone.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

from ..errors import CorruptCheckpointError

# safetensors (Rust) refuses headers over 100,000,000 bytes.  Real ones are far smaller: DeepSeek-V3's largest
# shard header is ~200 kB, and its whole model in one file (~92k entries) would be ~15 MB.  64 MiB is 4x that;
# with the count bounds below it bounds what json.loads can be made to allocate.
MAX_HEADER_BYTES = 64 << 20
# DeepSeek-V3 has ~92k tensors (weights + scales) in total; 262144 (2.8x) in ONE file leaves room for any real
# model saved unsharded and bounds parsing time and memory (measured: module docstring).
MAX_TENSORS_PER_FILE = 1 << 18
# Real tensors have <= 5 dims (video conv3d); 16 leaves room and bounds the shape product's size.
MAX_NDIM = 16
# An entry has 7 commas with a 2-D shape ({"dtype":..,"shape":[a,b],"data_offsets":[b,e]} plus the one after it);
# 16 per tensor leaves room for 10-D shapes and metadata.
_MAX_COMMAS = 16 * MAX_TENSORS_PER_FILE
_MAX_DIM = 1 << 63
_JSON_WS = b" \t\r\n"
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


class _HeaderProblem(Exception):
    """Raised inside the JSON hooks; turned into a CorruptCheckpointError naming the file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _HeaderProblem(f"duplicate JSON key {dup!r}")
    return out


def _no_constant(name: str) -> Any:
    raise _HeaderProblem(f"JSON constant {name} (not valid JSON)")


def loads_json_file(path: Path, max_bytes: int) -> Any:
    """A small JSON file (config, index) parsed with the header's JSON rules except ``NaN``/``Infinity`` (which
    ``json.dumps`` writes and transformers reads): UTF-8, no duplicate keys, bounded size and nesting.  Raises
    :class:`CorruptCheckpointError` naming the file."""

    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(problem, file=str(path), expected="a JSON object, each key once",
                                      fix="re-download or repair the file")

    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise bad(f"file is over {max_bytes} bytes, larger than any real one")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 ({e})") from None
    except _HeaderProblem as e:
        raise bad(f"not valid JSON: {e}") from None
    except RecursionError:
        raise bad("JSON nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, and integers over 4300 digits
        raise bad(f"not valid JSON ({str(e)[:200]})") from None


def _valid_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        return False
    return True


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool: json gives True/False for true/false, and bool is an int subclass


def parse_header(full: Path, size: int, itemsizes: Mapping[str, int]) -> tuple[int, list[tuple], dict[str, str]]:
    """``(data_start, [(name, dtype, shape, begin, end), ...], __metadata__ or {})`` of the safetensors file ``full`` (``size``
    bytes), ``begin``/``end`` absolute byte offsets.  Raises :class:`CorruptCheckpointError` naming the file,
    the tensor where there is one, what was expected and what was found."""

    def corrupt(problem: str, tensor: str | None = None, expected: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            problem, file=str(full), tensor=tensor, expected=expected,
            fix="the file is damaged or incompletely downloaded: re-download it",
        )

    with open(full, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"file is {size} bytes, too short for a safetensors header", expected=">= 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise corrupt(
                f"header length field says {n} bytes but the file has {size - 8} after it",
                expected=f"a header length that fits in the file and is at most {MAX_HEADER_BYTES} bytes",
            )
        raw = f.read(n)
    if len(raw) != n:
        raise corrupt(f"file ended after {8 + len(raw)} bytes inside its {n}-byte header (truncated?)",
                      expected=f"{8 + n} bytes of header")
    if not raw.lstrip(_JSON_WS).startswith(b"{"):  # safetensors 0.8 accepts leading whitespace too
        raise corrupt(f"header starts with {raw[:8]!r}", expected="a JSON object starting with '{'")
    # Upper bounds before json.loads allocates anything per value (byte counts: ~20 ms for 60 MB).  Every entry
    # is one JSON object, so '{' bounds the entries (an escaped key cannot hide one), and ',' bounds the values
    # at ~7 per entry; braces and commas inside strings only over-count.  With both bounded, json.loads builds
    # at most ~4M values (~0.3 GB) whatever the header holds.
    claimed, values = raw.count(b"{") - 1, raw.count(b",")
    if claimed > MAX_TENSORS_PER_FILE or values > _MAX_COMMAS:
        raise corrupt(f"header declares up to {max(claimed, values // 7)} tensors ({claimed + 1} JSON objects, "
                      f"{values} commas)",
                      expected=f"at most {MAX_TENSORS_PER_FILE} tensors in one file (shard the checkpoint)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise corrupt(f"header is not UTF-8 ({e})", expected="UTF-8 JSON") from None
    except _HeaderProblem as e:
        raise corrupt(f"header is not valid safetensors JSON: {e}", expected="each key once") from None
    except RecursionError:
        raise corrupt("header JSON is nested too deeply to parse", expected="a flat JSON object") from None
    except ValueError as e:  # JSONDecodeError, and integers over 4300 digits (int max_str_digits)
        raise corrupt(f"header is not valid JSON ({str(e)[:200]})", expected="a JSON object") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object", expected="a JSON object")

    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(v, str) and _valid_text(k) and _valid_text(v) for k, v in meta.items())):
        raise corrupt("__metadata__ is not an object of strings", tensor="__metadata__",
                      expected='{"key": "value", ...} with string values')
    if len(header) > MAX_TENSORS_PER_FILE:
        raise corrupt(f"header declares {len(header)} tensors",
                      expected=f"at most {MAX_TENSORS_PER_FILE} tensors in one file (shard the checkpoint)")

    data_start = 8 + n
    data_len = size - data_start
    out: list[tuple] = []
    append = out.append
    for name, entry in header.items():
        ok = _fast_entry(entry, itemsizes)
        if ok is None or not (name.isascii() or _valid_text(name)):
            _entry_problem(name, entry, itemsizes, corrupt)  # raises, naming what is wrong
        dtype, shape, begin, end = ok
        if end > data_len:
            raise corrupt(
                f"file is truncated: it has {size} bytes, this tensor ends at byte {data_start + end}",
                tensor=name, expected=f"at least {data_start + end} bytes",
            )
        append((name, dtype, shape, data_start + begin, data_start + end))
    _check_coverage(out, data_start, data_len, corrupt)
    return data_start, out, meta or {}


def _fast_entry(entry: Any, itemsizes: Mapping[str, int]) -> tuple | None:
    """``(dtype, shape, begin, end)`` of a well-formed entry, else ``None``: one pass with no generator or
    exception, so that the 262144-entry bound costs ~1 s, not the ~4 s of the all()-based checks."""
    if type(entry) is not dict or len(entry) != 3:
        return None
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str or type(shape) is not list or type(offs) is not list or len(offs) != 2 \
            or len(shape) > MAX_NDIM:
        return None
    nbytes = itemsizes.get(dtype)
    if nbytes is None:
        return None
    for d in shape:
        if type(d) is not int or d < 0 or d >= _MAX_DIM:  # type(): JSON true/false are bools, an int subclass
            return None
        nbytes *= d
    begin, end = offs
    if type(begin) is not int or type(end) is not int or begin < 0 or end - begin != nbytes:
        return None
    return dtype, tuple(shape), begin, end


def _entry_problem(name: str, entry: Any, itemsizes: Mapping[str, int], corrupt) -> None:
    """Raise the error that says what is wrong with an entry :func:`_fast_entry` refused."""
    if not _valid_text(name):
        raise corrupt(f"tensor name {name!r} is not valid Unicode", expected="UTF-8 names")
    if not isinstance(entry, dict):
        raise corrupt("header entry is not an object", tensor=name,
                      expected='{"dtype": .., "shape": [..], "data_offsets": [begin, end]}')
    if len(entry) != 3 or not _ENTRY_KEYS.issuperset(entry):
        # safetensors parses unknown fields too and refuses, e.g., a number out of range in one; every writer
        # writes exactly these three keys, so an entry with others is refused whatever they hold.
        raise corrupt(f"header entry has keys {sorted(entry)[:8]}", tensor=name,
                      expected='exactly {"dtype": .., "shape": [..], "data_offsets": [begin, end]}')
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in itemsizes:
        raise corrupt(f"unknown dtype {_short(dtype)}", tensor=name, expected=f"one of {sorted(itemsizes)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape)):
        raise corrupt(f"bad shape {_short(shape)}", tensor=name,
                      expected=f"a list of at most {MAX_NDIM} integers in [0, 2**63)")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise corrupt(f"bad data_offsets {_short(offs)}", tensor=name, expected="[begin, end], 0 <= begin <= end")
    nbytes = math.prod(shape) * itemsizes[dtype]
    raise corrupt(f"data_offsets {offs} span {offs[1] - offs[0]} bytes", tensor=name,
                  expected=f"{nbytes} bytes for {dtype} {shape}")


def _check_coverage(entries: list[tuple], data_start: int, data_len: int, corrupt) -> None:
    """Sorted by offset, each tensor starts where the previous ended, from 0 to the end of the file."""
    pos, prev = data_start, None
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != pos:
            what = (f"overlaps {prev!r} (which ends at data byte {pos - data_start})" if begin < pos
                    else f"leaves a gap of {begin - pos} unused bytes after {prev!r}" if prev is not None
                    else f"leaves {begin - pos} unused bytes at the start of the data")
            raise corrupt(f"tensor starts at data byte {begin - data_start} and {what}", tensor=name,
                          expected="tensors that cover the data region contiguously from byte 0, without gaps "
                          "or overlaps (as safetensors requires)")
        pos, prev = end, name
    if pos != data_start + data_len:
        raise corrupt(
            f"the tensors end at data byte {pos - data_start} but the file has {data_len} data bytes after "
            f"its {data_start - 8}-byte header: the header length field or the offsets are wrong",
            tensor=prev,
            expected="the last tensor to end exactly at the end of the file (no trailing bytes)",
        )


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."
