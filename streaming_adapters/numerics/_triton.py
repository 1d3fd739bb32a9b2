"""What the Triton kernels share: the optional import, availability, and the device's FP8 capability."""

from __future__ import annotations

import functools

import torch

try:  # Triton is optional: CPU-only installs use the torch paths of fp8.py / nvfp4.py.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None


@functools.cache
def triton_importable() -> bool:
    return triton is not None


def triton_available() -> bool:
    """True when the Triton path can run here: CUDA torch with a visible GPU and triton importable."""
    return triton_importable() and torch.version.cuda is not None and torch.cuda.is_available()


@functools.cache
def native_fp8(device_index: int) -> bool:
    """Hardware e4m3 conversions (``cvt.*.e4m3x2``) start at sm_89; older GPUs take the integer (SOFT) path."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def jit(fn, interpret: bool, no_specialize: list[str]):
    """The kernel ``fn`` compiled by Triton, or run by its CPU interpreter (tests without a GPU)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn, do_not_specialize=no_specialize)
