"""NeMo AutoModel integration: ``NeMoAutoModelForCausalLM.from_pretrained(<FP8 checkpoint>)`` loads any FP8
format our registry knows, exactly and shard by shard, under FSDP2, TP, PP, EP and PEFT.

Importing this module installs the hook (:func:`install`, idempotent); so does a NeMo recipe section
``streaming_adapters: {_target_: streaming_adapters.integrations.nemo.install}`` (NeMo imports every
``_target_`` while parsing the YAML, on every rank, before the model is built), and, opt-in, every NeMo
import in an environment (``python -m streaming_adapters.integrations.nemo_autoload enable``).  See
docs/nemo.md.

What changes: for a config with a ``quantization_config`` our format registry reads, NeMo's model-class
resolution returns a subclass of the class it would have built whose ``state_dict_adapter`` loads the base
checkpoint in bounded parts (:mod:`.hook`, :mod:`.adapter`, :mod:`.loader`).  Other configs: nothing.

Memory model (per rank): the model's own shards + the read core's transient (``chunk_bytes`` of staged FP8
codes at most, plus the dequantization scratch): each part is read chunk by chunk straight into the shards.
No rank builds the whole model, a layer, a host temporary of a tensor, or a tensor it does not own.
"""

from __future__ import annotations

from .adapter import OPTIONS, IdentityAdapter, StreamingFP8Loading, streaming_adapter
from .hook import fp8_format, streaming_class, wrap_resolver
from .loader import DEFAULT_MAX_PART_BYTES

__all__ = ["IdentityAdapter", "StreamingFP8Loading", "configure", "fp8_format", "install", "installed",
           "streaming_adapter", "streaming_class", "uninstall"]


def _model_init():
    try:
        from nemo_automodel._transformers import model_init
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("streaming_adapters.integrations.nemo needs nemo_automodel (pip install "
                          "'streaming-adapters[nemo]', tested with nemo_automodel 0.7.0)") from e
    return model_init


def _ours(resolver) -> bool:
    return hasattr(resolver, "_streaming_adapters_original")


def installed() -> bool:
    """True if NeMo's model-class resolution goes through the hook (possibly wrapped again since: NeMo's own
    Mistral3 VLM module wraps the same function when it is first imported)."""
    mi = _model_init()
    return _ours(mi._resolve_custom_model_cls_for_config) or bool(getattr(mi, "_streaming_adapters_installed", False))


def configure(*, chunk_bytes: int | None = None, max_part_bytes: int | None = None) -> None:
    """Options of the FP8 models built from now on; no argument restores the defaults.

    Args:
        chunk_bytes: FP8 code bytes dequantized at once per rank (default 64 MiB).
        max_part_bytes: FP8 bytes per load part and rank before a decoder layer is split into more parts
            (default 4 GiB; one ``dcp.load`` + ``finish`` each; no longer host memory: parts are read
            straight into the model's shards).
    """
    from ...read import DEFAULT_CHUNK_BYTES

    OPTIONS["chunk_bytes"] = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    OPTIONS["max_part_bytes"] = DEFAULT_MAX_PART_BYTES if max_part_bytes is None else int(max_part_bytes)


def install(*_args, chunk_bytes: int | None = None, max_part_bytes: int | None = None, **_kwargs) -> bool:
    """Hook NeMo's model-class resolution (idempotent; other arguments are ignored, so a YAML ``_target_`` may
    call it).  Options as :func:`configure` (given ones only).  Returns True if this call installed it."""
    if chunk_bytes is not None or max_part_bytes is not None:
        configure(chunk_bytes=chunk_bytes or OPTIONS["chunk_bytes"],
                  max_part_bytes=max_part_bytes or OPTIONS["max_part_bytes"])
    mi = _model_init()
    if _ours(mi._resolve_custom_model_cls_for_config) or getattr(mi, "_streaming_adapters_installed", False):
        return False
    mi._resolve_custom_model_cls_for_config = wrap_resolver(mi._resolve_custom_model_cls_for_config)
    mi._streaming_adapters_installed = True
    return True


def uninstall() -> bool:
    """Undo :func:`install` (only if nothing wrapped the resolver after us).  Returns True if undone."""
    mi = _model_init()
    current = mi._resolve_custom_model_cls_for_config
    if not _ours(current):
        return False
    mi._resolve_custom_model_cls_for_config = current._streaming_adapters_original
    mi._streaming_adapters_installed = False
    return True


install()
