"""An independent NVFP4 reference for the ModelOpt format, written from formats.md §2.2 in a deliberately
different style from ``streaming_adapters.numerics.nvfp4``: scalar Python over small tensors, numpy float32
scalars for the fp32 arithmetic, and round-to-nearest-even by searching explicit value tables (no bit
tricks, no lookup tables over BF16 patterns, no torch casts to float8).

Shares no code with the package.  Choices that formats.md leaves open are the package's documented ones:
``amax == 0`` gives ``weight_scale_2 = 1.0``; ``producer_device="cuda"`` computes ``amax * fp32(1/2688)``.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e4m3_value(code: int) -> float:
    """Value of a positive float8_e4m3fn code (0..126): bias 7, subnormals below exponent field 1."""
    e, m = code >> 3, code & 7
    return (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3 = [(e4m3_value(c), c) for c in range(127)]


def nearest_even(x: float, table: list[tuple[float, int]]) -> int:
    """Code of the table value nearest to ``x`` (exact double arithmetic on fp32 inputs); a tie goes to
    the even code, which is the even mantissa in both E2M1 and E4M3."""
    best = min(abs(x - v) for v, _ in table)
    codes = [c for v, c in table if abs(x - v) == best]
    return min(codes, key=lambda c: (c & 1, c))


def e2m1_code(q: float) -> int:
    """sign << 3 | RNE(|q|) on {0, .5, 1, 1.5, 2, 3, 4, 6}; anything above 6 saturates to 6."""
    mag = nearest_even(min(abs(q), 6.0), [(v, c) for c, v in enumerate(E2M1)])
    return (8 if q < 0 else 0) | mag


def bf16_round(x: np.float32) -> float:
    """RNE of an fp32 value to BF16 (finite inputs), by rounding the 32-bit pattern at bit 16."""
    b = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return float(np.array([b], dtype=np.uint32).view(np.float32)[0])


def modelopt_scale_2(amax: float, producer_device: str = "cuda") -> np.float32:
    if amax == 0:
        return F32(1.0)
    if producer_device == "cuda":
        return F32(amax) * F32(1.0 / 2688.0)
    return F32(amax) / F32(2688.0)


def quantize_modelopt(w: torch.Tensor, w2: np.float32) -> tuple[list[list[int]], list[list[int]]]:
    """(packed bytes, E4M3 scale codes) as nested lists, for a small BF16 ``[N, K]``."""
    rows = w.float().tolist()  # BF16 -> fp32 is exact
    packed, scales = [], []
    for row in rows:
        nib, srow = [], []
        for b0 in range(0, len(row), 16):
            block = row[b0:b0 + 16]
            amax_b = max(abs(x) for x in block)
            s = F32(amax_b) / (F32(6.0) * w2)
            if s == 0:
                s = F32(1.0)
            s = min(max(float(s), 2.0**-9), 448.0)
            code = nearest_even(s, E4M3)
            srow.append(code)
            eff = F32(e4m3_value(code)) * w2
            nib.extend(e2m1_code(float(F32(x) / eff)) for x in block)
        packed.append([nib[j] | nib[j + 1] << 4 for j in range(0, len(nib), 2)])
        scales.append(srow)
    return packed, scales


def dequantize_modelopt(packed: list[list[int]], scales: list[list[int]], w2: np.float32) -> list[list[float]]:
    """``bf16(e2m1_values[q] * fp32(s8 * w2))``; ModelOpt's table has +0.0 at code 8."""
    signed = E2M1 + [0.0] + [-v for v in E2M1[1:]]
    out = []
    for prow, srow in zip(packed, scales):
        vals = []
        for j, byte in enumerate(prow):
            eff = F32(e4m3_value(srow[(2 * j) // 16])) * w2
            for nib in (byte & 15, byte >> 4):
                vals.append(bf16_round(F32(signed[nib]) * eff))
        out.append(vals)
    return out
