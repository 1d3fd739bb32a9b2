"""CPU shim for NeMo AutoModel 0.7.0 in *this test process only* (and its pool workers).

NeMo's ``from_pretrained`` calls ``torch.cuda.current_device()`` and passes ``cuda:<n>`` as the target device
(``_transformers/auto_model.py``: ``_build_model`` and ``from_pretrained``), so it cannot run on a CPU-only
machine as shipped.  ``install()`` patches three names, in memory, in this process:

* ``torch.cuda.current_device`` returns 0 instead of raising on a CPU-only torch build;
* ``auto_model.instantiate_infrastructure`` / ``auto_model.apply_model_infrastructure`` (the names NeMo's
  auto_model module imported) are wrapped to receive ``device=cpu`` instead of ``cuda:0``;
* ``Checkpointer.initialize_model_weights`` passes ``buffer_device=cpu`` to models whose
  ``initialize_weights(buffer_device=None)`` would otherwise pick ``cuda:<current_device()>`` (NeMo's
  DeepSeek-V3 and other MoE classes).

No NeMo file is edited, nothing is patched on a machine with CUDA (``install()`` is a no-op there), and the
rest of NeMo -- config parsing, model classes, meshes, FSDP2/TP/PP/EP parallelizers, the checkpointer and its
load-part validation -- runs unchanged.  Device meshes are created on CPU by NeMo itself
(``mesh_utils._mesh_device_type`` picks "cpu" under gloo).
"""

from __future__ import annotations

import functools
import inspect

import torch

_INSTALLED = False


def install() -> bool:
    """Patch this process for CPU; True if patched, False on a CUDA machine (nothing to do)."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from nemo_automodel._transformers import auto_model

    torch.cuda.current_device = lambda: 0  # type: ignore[assignment]

    def on_cpu(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            return fn(*args, **kwargs)

        return wrapper

    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer

    original_init_weights = Checkpointer.initialize_model_weights

    def initialize_model_weights(model, device, peft_init_method=None):
        init = getattr(model, "initialize_weights", None)
        if init is not None and "buffer_device" in inspect.signature(init).parameters:
            model.initialize_weights = functools.partial(init, buffer_device=torch.device("cpu"))
            try:
                return original_init_weights(model, device, peft_init_method=peft_init_method)
            finally:
                del model.initialize_weights
        return original_init_weights(model, device, peft_init_method=peft_init_method)

    Checkpointer.initialize_model_weights = staticmethod(initialize_model_weights)
    auto_model.instantiate_infrastructure = on_cpu(auto_model.instantiate_infrastructure)
    auto_model.apply_model_infrastructure = on_cpu(auto_model.apply_model_infrastructure)
    _INSTALLED = True
    return True
