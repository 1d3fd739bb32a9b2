"""Calibration tokens from local files (no hub), checked before any compute.

Forms (``source``):

    *.jsonl           one JSON object a line: ``{"input_ids": [..]}``, ``{"text": "..."}`` or
                      ``{"messages": [{"role": .., "content": ..}, ..]}`` (rendered with the chat template)
    *.safetensors     a tensor ``input_ids`` [N, S] (integer)
    *.pt              a tensor [N, S], or a dict holding ``input_ids`` [N, S]
    a folder          ``datasets.Dataset.save_to_disk`` output with an input_ids / text / messages column

llm-compressor's defaults, so it can be the bit-exact reference (formats.md §4): batch 1, the first
``samples`` rows, each truncated to ``seq_len`` tokens, no padding.  Text is tokenized with the tokenizer's
own special tokens (BOS for Llama); rendered chat messages are not given a second BOS (the template has it).

Memory: the token ids of ``samples`` rows (512 x 2048 int64 = 8 MiB at the defaults).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CalibrationDataError
from .config import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN


@dataclass
class CalibrationTokens:
    """The calibration samples: ``samples[i]`` is a 1-D int64 tensor of at most ``seq_len`` ids."""

    samples: list[torch.Tensor]
    source: str
    seq_len: int
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = tokens_sha256(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)

    def shard(self, rank: int, world: int) -> list[int]:
        """Sample indices of ``rank``: contiguous, balanced by tokens (the per-layer time is ~tokens)."""
        total, acc, cuts = self.num_tokens, 0, [0]
        for i, s in enumerate(self.samples):
            acc += int(s.numel())
            while len(cuts) < world and acc * world >= total * len(cuts):
                cuts.append(i + 1)
        cuts += [len(self.samples)] * (world + 1 - len(cuts))
        return list(range(cuts[rank], cuts[rank + 1]))


def tokens_sha256(samples: list[torch.Tensor]) -> str:
    """sha256 over every sample as its length (8 bytes, little endian) then its ids (int64 LE): two runs
    with this hash calibrated on the same tokens."""
    h = hashlib.sha256()
    for s in samples:
        ids = s.to(torch.int64).contiguous()
        h.update(struct.pack("<Q", ids.numel()))
        h.update(ids.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def load_calibration_tokens(
    source: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    vocab_size: int | None = None,
) -> CalibrationTokens:
    """Read, tokenize, truncate and check ``samples`` calibration samples from ``source``.

    ``tokenizer``: folder of the tokenizer for text / messages (default ``checkpoint``).  ``vocab_size``:
    ids must lie in ``[0, vocab_size)`` (default: ``checkpoint``'s config.json).  Raises
    :class:`CalibrationDataError` for a missing or malformed source, too few samples, an empty sample or
    an id outside the vocabulary.
    """
    path = Path(source)
    if not path.exists():
        raise CalibrationDataError("the calibration data does not exist", file=str(path),
                                   expected="a .jsonl, .safetensors or .pt file, or a datasets.save_to_disk folder",
                                   fix="check calibration.data (a local path; nothing is downloaded)")
    if vocab_size is None and checkpoint is not None:
        vocab_size = _vocab_size(Path(checkpoint))
    tok_path = tokenizer if tokenizer is not None else checkpoint
    rows = _rows(path)
    out: list[torch.Tensor] = []
    tok = None
    for i, row in enumerate(rows):
        if len(out) == samples:
            break
        if row.get("input_ids") is not None:
            ids = _ids(row["input_ids"], path, i)
        else:
            if tok is None:
                tok = _tokenizer(tok_path, path)
            ids = _tokenize(tok, row, path, i)
        ids = ids[:seq_len]
        if ids.numel() == 0:
            raise CalibrationDataError(f"calibration sample {i} has no tokens", file=str(path), tensor=f"row {i}",
                                       expected="at least one token per sample",
                                       fix="drop empty rows from the calibration data")
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise CalibrationDataError(
                f"calibration sample {i} holds token id {bad}, outside the vocabulary", file=str(path),
                tensor=f"row {i}", expected=f"ids in [0, {vocab_size}) (config.json vocab_size)",
                fix="tokenize with this checkpoint's tokenizer (calibration.tokenizer), or give text instead of ids")
        out.append(ids)
    if len(out) < samples:
        raise CalibrationDataError(
            f"the calibration data holds {len(out)} sample(s), fewer than the {samples} asked for", file=str(path),
            expected=f"at least {samples} rows", fix=f"add rows, or lower calibration.samples to {len(out) or 1}")
    return CalibrationTokens(out, str(path), seq_len)


def _vocab_size(checkpoint: Path) -> int | None:
    try:
        cfg = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
    return cfg.get("vocab_size")


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.is_dir():
        return _dataset_rows(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix in (".safetensors", ".pt", ".pth"):
        return ({"input_ids": r} for r in _tensor_ids(path))
    raise CalibrationDataError(f"unknown calibration data type {suffix!r}", file=str(path),
                               expected="a .jsonl, .safetensors or .pt file, or a datasets.save_to_disk folder",
                               fix="convert the data to .jsonl with a text, messages or input_ids field")


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise CalibrationDataError(f"line {n} of the calibration data is not JSON ({e})", file=str(path),
                                           expected="one JSON object per line",
                                           fix="fix or remove that line") from None
            if not isinstance(row, dict) or not any(k in row for k in ("input_ids", "text", "messages")):
                raise CalibrationDataError(f"line {n} of the calibration data has no text, messages or input_ids",
                                           file=str(path), expected='{"text": ...}, {"messages": [...]} or '
                                           '{"input_ids": [...]}', fix="rename the field holding the sample")
            yield row


def _tensor_ids(path: Path) -> torch.Tensor:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's to fix
        raise CalibrationDataError(f"cannot read the calibration data ({type(e).__name__}: {e})", file=str(path),
                                   expected="a safetensors / torch file holding input_ids [N, S]",
                                   fix="re-save it with safetensors.torch.save_file({'input_ids': ids}, path)") from None
    ids = data.get("input_ids") if isinstance(data, dict) else data
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CalibrationDataError(f"the calibration data has no integer input_ids [N, S] (found {got})",
                                   file=str(path), tensor="input_ids", expected="an integer tensor [N, S]",
                                   fix="save the token ids as input_ids of shape [samples, seq_len]")
    return ids.to(torch.int64)


def _dataset_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError("a calibration folder needs the datasets package", file=str(path),
                                   expected="datasets installed (pip install datasets)",
                                   fix="pip install datasets, or export the rows to .jsonl") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise CalibrationDataError(f"cannot open the calibration folder ({type(e).__name__}: {e})", file=str(path),
                                   expected="a datasets.Dataset.save_to_disk folder",
                                   fix="save it with Dataset.save_to_disk, or export the rows to .jsonl") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if not any(c in ds.column_names for c in ("input_ids", "text", "messages")):
        raise CalibrationDataError(f"the calibration dataset has no text, messages or input_ids column "
                                   f"(columns: {ds.column_names})", file=str(path),
                                   expected="an input_ids, text or messages column",
                                   fix="rename the column holding the samples")
    return iter(ds)


def _ids(value: Any, path: Path, i: int) -> torch.Tensor:
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return torch.zeros(0, dtype=torch.int64)  # as_tensor([]) is float32; refused as empty by the caller
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise CalibrationDataError(f"input_ids of calibration sample {i} are not a list of integers",
                                   file=str(path), tensor=f"row {i}", expected="input_ids: [int, ...]",
                                   fix="store one flat list of token ids per sample")
    return ids.to(torch.int64)


def _tokenizer(tok_path, data: Path):
    if tok_path is None:
        raise CalibrationDataError("text calibration data needs a tokenizer", file=str(data),
                                   expected="calibration.tokenizer or a checkpoint folder with tokenizer files",
                                   fix="pass calibration.tokenizer=<folder>, or give input_ids instead of text")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure means no usable tokenizer there
        raise CalibrationDataError(f"no tokenizer could be loaded ({type(e).__name__}: {e})", file=str(tok_path),
                                   expected="tokenizer.json / tokenizer_config.json in that folder",
                                   fix="pass calibration.tokenizer=<folder with the tokenizer>") from None


def _tokenize(tok, row: dict[str, Any], path: Path, i: int) -> torch.Tensor:
    if row.get("messages") is not None:
        if not getattr(tok, "chat_template", None):
            raise CalibrationDataError("messages need a chat template, and the tokenizer has none", file=str(path),
                                       tensor=f"row {i}", expected="chat_template in tokenizer_config.json",
                                       fix="give text instead of messages, or a tokenizer with a chat template")
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if not isinstance(row.get("text"), str):
        raise CalibrationDataError(f"calibration sample {i} has no text, messages or input_ids", file=str(path),
                                   tensor=f"row {i}", expected="a text string, a messages list or input_ids",
                                   fix="fix that row")
    return torch.tensor(tok(row["text"])["input_ids"], dtype=torch.int64)
