"""Evaluation rows from a plain text file: tokenized whole, cut into consecutive rows of ``seq_len`` tokens.

(calibrate.data reads one sample per JSON line; a perplexity run usually has one long text.)  The tokenizer's
special tokens are added once, at the start of the text; the last partial row is kept if it has >= 2 tokens
(one prediction).  Memory: the text's ids (int64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..calibrate.data import CalibrationTokens
from ..errors import CalibrationDataError


def text_rows(path: Path, tokenizer, *, samples: int | None, seq_len: int) -> CalibrationTokens:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure means no usable tokenizer there
        raise CalibrationDataError(f"no tokenizer could be loaded ({type(e).__name__}: {e})", file=str(tokenizer),
                                   expected="tokenizer.json / tokenizer_config.json in that folder",
                                   fix="pass tokenizer=<folder with the tokenizer>, or token ids instead of text") from None
    ids = torch.tensor(tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"], dtype=torch.int64)
    rows = [r for r in ids.split(seq_len) if r.numel() >= 2]
    if samples:
        rows = rows[:samples]
    if not rows:
        raise CalibrationDataError("the text gives no row of two tokens", file=str(path),
                                   expected="a text of at least two tokens", fix="give a longer text")
    return CalibrationTokens(rows, str(path), seq_len)
