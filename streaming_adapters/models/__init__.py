"""Model-level loading: per-family key mappers (separate from the scale-format adapters) and
``load_fp8_checkpoint`` for built, parallelized ``nn.Module``s."""

from .families import get_key_mapper, list_key_mappers, register_key_mapper
from .fsdp import fully_shard_layers
from .keymap import Chain, FusedExperts, KeyMapper, Part, Renames, Tied
from .load import ModelLoadReport, load_fp8_checkpoint

__all__ = ["Chain", "fully_shard_layers", "FusedExperts", "KeyMapper", "ModelLoadReport", "Part", "Renames", "Tied", "get_key_mapper",
           "list_key_mappers", "load_fp8_checkpoint", "register_key_mapper"]
