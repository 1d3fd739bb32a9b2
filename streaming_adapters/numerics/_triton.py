"""What the Triton kernels share: the optional import, availability, and the device's FP8 capability."""

from __future__ import annotations

import functools
import types

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


def jit(fn, interpret: bool, no_specialize: list[str], helpers: tuple = ()):
    """The kernel ``fn`` compiled by Triton, or run by its CPU interpreter (tests without a GPU).

    ``helpers``: plain functions ``fn`` calls.  Triton wants them wrapped the same way as the kernel (a
    ``JITFunction`` inside a compiled kernel, an ``InterpretedFunction`` inside an interpreted one), so the
    kernel gets its own globals with the helpers wrapped for its mode; the module's stay plain."""
    from triton.runtime.interpreter import InterpretedFunction

    wrap = InterpretedFunction if interpret else triton.jit
    def rebind(f, g):  # the same function reading its globals from g
        out = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
        # Triton reads which parameters are tl.constexpr from the annotations; FunctionType does not copy them
        out.__annotations__, out.__qualname__, out.__module__ = dict(f.__annotations__), f.__qualname__, f.__module__
        return out

    if helpers:
        g = dict(fn.__globals__)  # helpers calling helpers resolve them here too
        g.update({h.__name__: wrap(rebind(h, g)) for h in helpers})
        fn = rebind(fn, g)
    return InterpretedFunction(fn) if interpret else triton.jit(fn, do_not_specialize=no_specialize)
