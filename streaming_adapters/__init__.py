"""streaming_adapters: load FP8 checkpoints shard by shard, dequantizing into each rank's own BF16 shard.

Public API::

    load_fp8_state_dict(state_dict, checkpoint_path, *, process_group=None, **options) -> LoadReport
    load_fp8_checkpoint(model, checkpoint_path, *, device_mesh=None, **options) -> LoadReport
    fully_shard_layers(model, mesh)  # FSDP2 per layer; F32 routers (DeepSeek-V3) as units of their own
    convert_checkpoint(src, dst, *, target, format=None, process_group=None, **options) -> ConvertReport
    verify_checkpoint(nvfp4_dir, reference=fp8_dir) -> VerifyReport
    get_adapter(checkpoint_path_or_config) / list_adapters() / register_adapter
    StreamingFP8StorageReader       # the DCP storage reader, for use with torch.distributed.checkpoint.load
    evaluate(checkpoint, tokens, *, reference=None, emulate_activations=False, ...) -> dict  # docs/evaluate.md
"""

from .errors import CheckpointError
from .formats import (
    StreamingFP8StateDictAdapter,
    get_adapter,
    list_adapters,
    register_adapter,
)
from .load import load_fp8_state_dict
from .models import fully_shard_layers, get_key_mapper, load_fp8_checkpoint, register_key_mapper
from .convert import ConvertReport, convert_checkpoint
from .convert.verify import VerifyReport, verify_checkpoint
from .reader import StreamingFP8StorageReader
from .report import LoadReport
from .quality import evaluate


def _keep_old_evaluate_paths() -> None:
    """``streaming_adapters.evaluate.<module>`` (the package's name before ``evaluate`` became the function):
    the same module objects as ``streaming_adapters.quality.<module>``, so old imports keep working and see the
    same classes. Registered in sys.modules, where the import system looks first; the attribute
    ``streaming_adapters.evaluate`` stays the function (a fresh import of an alias would overwrite it)."""
    import sys

    from . import quality
    from .quality import config, data, emulate, metrics, plot, run, task

    sys.modules[f"{__name__}.evaluate"] = quality
    for m in (config, data, emulate, metrics, plot, run, task):
        sys.modules[f"{__name__}.evaluate.{m.__name__.rsplit('.', 1)[1]}"] = m


_keep_old_evaluate_paths()

from ._version import __version__  # noqa: F401  (streaming_adapters.__version__)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "StreamingFP8StateDictAdapter",
    "StreamingFP8StorageReader",
    "get_adapter",
    "list_adapters",
    "load_fp8_state_dict",
    "register_adapter",
    "load_fp8_checkpoint",
    "fully_shard_layers",
    "get_key_mapper",
    "register_key_mapper",
    "convert_checkpoint",
    "ConvertReport",
    "verify_checkpoint",
    "VerifyReport",
    "evaluate",
]
