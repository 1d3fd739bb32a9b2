"""The NaN-code check of FP8 boxes (numerics/fp8.first_nan_code: SWAR over 8 codes, then byte by byte) against
the plain byte rule, on contiguous, sliced (unaligned) and transposed boxes with and without a planted NaN."""

from __future__ import annotations

import torch

from streaming_adapters.numerics.fp8 import first_nan_code


def byte_rule(c: torch.Tensor):
    bad = (c.view(torch.uint8) & 0x7F) == 0x7F
    return tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else None


def test_first_nan_code_equals_the_byte_rule():
    g = torch.Generator().manual_seed(0)
    found = 0
    for trial in range(300):
        r, cols = int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
        u = torch.randint(0, 256, (r, cols), generator=g, dtype=torch.uint8)
        u[(u & 0x7F) == 0x7F] = 0x7E
        if trial % 2:  # one NaN code, 0x7F or 0xFF, anywhere
            u.view(-1)[int(torch.randint(0, r * cols, (1,), generator=g))] = (0x7F, 0xFF)[trial % 4 // 2]
        c = u.view(torch.float8_e4m3fn)
        for v in (c, c[:, 1:] if cols > 1 else c, c.t(), c.reshape(-1)):
            want = byte_rule(v)
            assert first_nan_code(v) == want, trial
            found += want is not None
    assert found > 300  # the planted codes were seen, not only clean boxes
    # Every byte value, at every position of an aligned 8-byte word.
    for pos in range(8):
        for b in range(256):
            u = torch.full((4, 8), 0x10, dtype=torch.uint8)
            u[2, pos] = b
            assert first_nan_code(u.view(torch.float8_e4m3fn)) == ((2, pos) if b & 0x7F == 0x7F else None)
