"""The hook on NeMo's model-class resolution (``model_init._resolve_custom_model_cls_for_config``).

NeMo asks that function, for every config, which class to build; a class (rather than ``None``) means "build
it on the meta device, parallelize it, then ``Checkpointer.load_model`` it".  For an FP8 config whose format
our registry knows, the hook answers with a cached subclass of the class NeMo would have built -- its own
re-implementation (Llama, Qwen3, DeepSeek-V3, ...) or, for architectures NeMo leaves to transformers
(Mistral, ...), transformers' class wrapped as NeMo wraps it -- whose ``state_dict_adapter`` is
:func:`~.adapter.streaming_adapter` of the model's own.  Same name, module and ``__init__`` signature as the
base, so NeMo's lookups by class name and its constructor-argument filter see no difference.

Every other config gets exactly what the original function returns, as do classes that already own a
streaming FP8 load (``_supports_streaming_fp8_checkpoint_load``: NeMo's Mistral3 FP8 VLM).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ...errors import UnknownFormatError
from ...formats import get_adapter
from .adapter import streaming_adapter

logger = logging.getLogger("streaming_adapters.nemo")

_CLASSES: dict[type, type] = {}


def fp8_format(config) -> str | None:
    """``quant_method/layout`` of a quantized config our registry reads, else None (unquantized or unknown)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") is None:
        return None
    try:
        adapter = get_adapter({"quantization_config": qc})
    except UnknownFormatError:
        return None
    # NVFP4 inputs (formats/nvfp4_*.py): the parts loader now reads through the read core, which decodes them,
    # but no NeMo test covers them yet (tests/nemo has no NVFP4 oracle): NeMo keeps its own path for them.
    return None if adapter.layout == "nvfp4" else adapter.name


def streaming_class(base: type) -> type:
    """``base`` whose instances get a streaming FP8 ``state_dict_adapter`` (cached per base)."""
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls
    original_init = base.__init__

    @functools.wraps(original_init)  # keeps the signature NeMo filters constructor kwargs against
    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        original_init(self, config, *args, **kwargs)
        self.state_dict_adapter = streaming_adapter(config, self.__dict__.get("state_dict_adapter"))

    cls = type(base)(base.__name__, (base,), {
        "__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__,
        "_supports_streaming_fp8_checkpoint_load": True, "_streaming_adapters_base": base,
    })
    _CLASSES[base] = cls
    return cls


def transformers_class(config) -> type | None:
    """The class NeMo's transformers fallback would build (``architectures[0]``), wrapped the way NeMo wraps
    it (``HFCheckpointingMixin``, parallelization metadata), or None."""
    import transformers
    from nemo_automodel._transformers.model_init import _get_mixin_wrapped_class

    archs = getattr(config, "architectures", None) or []
    hf_cls = getattr(transformers, archs[0], None) if archs else None
    return _get_mixin_wrapped_class(hf_cls) if isinstance(hf_cls, type) else None


def wrap_resolver(original: Callable) -> Callable:
    """The hooked resolver (marked, so installing twice is a no-op)."""

    @functools.wraps(original)
    def resolve(config):
        base = original(config)
        fmt = fp8_format(config)
        if fmt is None or (base is not None and getattr(base, "_supports_streaming_fp8_checkpoint_load", False)):
            return base
        base = base if base is not None else transformers_class(config)
        if base is None:
            return None
        logger.info("streaming_adapters: %s checkpoint -> %s with a streaming FP8 state_dict_adapter", fmt,
                    base.__name__)
        return streaming_class(base)

    resolve._streaming_adapters_original = original  # type: ignore[attr-defined]
    return resolve
