"""The ``state_dict_adapter`` of FP8 models: NeMo's ``StateDictAdapter`` whose base-checkpoint load is ours
(format registry, key mappers, numerics), everything else the model's own adapter's.

``streaming_adapter(config, inner)`` returns an instance of ``StreamingFP8<Inner>``, a subclass of the
model's own adapter class (NeMo's MoE families: grouped-expert layouts, PEFT name maps, saving) with the same
state, so NeMo's ``isinstance`` checks and attributes keep working; without an own adapter the base is
:class:`IdentityAdapter` (the model's names are the checkpoint's: Llama, Qwen, Mistral, ...).

The base load goes through :meth:`StreamingFP8Loading.iter_checkpoint_load_parts` (NeMo's bounded-parts
path).  If NeMo takes its other path -- ``to_hf(quantization=True)``, asking for FP8 destinations to be
dequantized whole later -- the adapter refuses loudly instead of letting FP8 codes reach BF16 parameters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nemo_automodel.components.checkpoint.state_dict_adapter import StateDictAdapter

from ...errors import DestinationError
from ...read import DEFAULT_CHUNK_BYTES
from .loader import DEFAULT_MAX_PART_BYTES, PartsLoad, PartsLoadStats


def checkpoint_dir(config) -> Path:
    """The local checkpoint folder of a config NeMo loaded (a folder, or a Hub id NeMo already downloaded)."""
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", "")
    if name and os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=getattr(config, "_commit_hash", None), local_files_only=True))


class IdentityAdapter(StateDictAdapter):
    """Model names are checkpoint names (transformers-layout models)."""

    def to_hf(self, state_dict: dict[str, Any], exclude_key_regex: str | None = None, quantization: bool = False,
              **kwargs) -> dict[str, Any]:
        return {k: v for k, v in state_dict.items() if not (exclude_key_regex and re.match(exclude_key_regex, k))}

    def from_hf(self, hf_state_dict: dict[str, Any], device_mesh=None, **kwargs) -> dict[str, Any]:
        return dict(hf_state_dict)

    def convert_single_tensor_to_hf(self, fqn: str, tensor: Any, **kwargs) -> list[tuple[str, Any]]:
        regex = kwargs.get("exclude_key_regex")
        return [] if regex and re.match(regex, fqn) else [(fqn, tensor)]


class StreamingFP8Loading:
    """Mixin placed in front of the model's adapter class (see :func:`streaming_adapter`).

    Attributes (set by :func:`streaming_adapter`): ``sa_config`` (the model's config: ``name_or_path`` locates
    the checkpoint), ``sa_chunk_bytes`` (FP8 code bytes dequantized at once), ``sa_max_part_bytes`` (FP8
    bytes per part and rank before a decoder layer is split), ``sa_last_load`` (this rank's
    :class:`~.loader.PartsLoadStats` of the last load)."""

    sa_config: Any = None
    sa_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    sa_max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    sa_last_load: PartsLoadStats | None = None

    def iter_checkpoint_load_parts(self, model_state_dict, device_mesh=None):
        inner = None if isinstance(self, IdentityAdapter) else self
        load = PartsLoad(checkpoint_dir(self.sa_config), model_state_dict, inner=inner, device_mesh=device_mesh,
                         chunk_bytes=self.sa_chunk_bytes, max_part_bytes=self.sa_max_part_bytes)
        self.sa_last_load = load.stats
        return iter(load)

    def to_hf(self, state_dict: dict[str, Any], exclude_key_regex: str | None = None, quantization: bool = False,
              **kwargs) -> dict[str, Any]:
        if quantization:
            raise DestinationError(
                "NeMo asked for FP8 destinations (its whole-tensor dequantization path) instead of load parts",
                file=str(getattr(self.sa_config, "_name_or_path", "")), tensor=None,
                expected="Checkpointer.load_model taking the load-parts path (one model part per rank, "
                "allow_checkpoint_key_subset=False, a safetensors checkpoint)",
                fix="use one pipeline stage per rank (no virtual stages); FP8 codes are never copied without "
                "their scales")
        return super().to_hf(state_dict, exclude_key_regex=exclude_key_regex, quantization=False, **kwargs)


_CLASSES: dict[type, type] = {}
#: Options of adapters created from now on (``streaming_adapters.integrations.nemo.configure``).
OPTIONS: dict[str, int] = {"chunk_bytes": DEFAULT_CHUNK_BYTES, "max_part_bytes": DEFAULT_MAX_PART_BYTES}


def streaming_adapter(config, inner: StateDictAdapter | None = None, *, chunk_bytes: int | None = None,
                      max_part_bytes: int | None = None) -> StateDictAdapter:
    """The adapter of an FP8 model: ``inner``'s class and state behind :class:`StreamingFP8Loading`."""
    chunk_bytes = OPTIONS["chunk_bytes"] if chunk_bytes is None else chunk_bytes
    max_part_bytes = OPTIONS["max_part_bytes"] if max_part_bytes is None else max_part_bytes
    if isinstance(inner, StreamingFP8Loading):
        return inner
    base = type(inner) if inner is not None else IdentityAdapter
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(base)(f"StreamingFP8{base.__name__}", (StreamingFP8Loading, base),
                                          {"__module__": __name__})
    adapter = cls.__new__(cls)
    if inner is not None:
        adapter.__dict__.update(inner.__dict__)
    adapter.sa_config, adapter.sa_chunk_bytes, adapter.sa_max_part_bytes = config, chunk_bytes, max_part_bytes
    return adapter
