"""Assertions shared by the tests: bit equality, with the first difference in the message."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Every non-NaN element identical to the bit (so -0.0 != 0.0), NaN exactly where the reference has
    NaN.  NaN payload and sign are not compared: they differ between scalar, SIMD and GPU conversions
    (0x7FC0 vs 0xFFC0 vs 0x7FFF in BF16) and carry no value; NaN only arises from NaN codes or scales."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    g, w = bits(got), bits(want)
    if got.is_floating_point():
        gn, wn = torch.isnan(got), torch.isnan(want)
        assert torch.equal(gn, wn), f"{name}: NaN at different places ({int(gn.sum())} vs {int(wn.sum())})"
        g, w = torch.where(gn, torch.zeros_like(g), g), torch.where(wn, torch.zeros_like(w), w)
    if not torch.equal(g, w):
        diff = (g != w).nonzero()
        i = tuple(int(x) for x in diff[0])
        raise AssertionError(
            f"{name}: {diff.shape[0]} of {g.numel()} elements differ; first at {i}: "
            f"got {got[i].item()!r} want {want[i].item()!r}"
        )


def poisoned_like(shape, dtype=torch.bfloat16) -> torch.Tensor:
    """NaN-filled destination, so an element nobody wrote fails the comparison."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype)
