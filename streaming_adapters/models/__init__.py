"""Model-level loading: per-family key mappers (separate from the scale-format adapters) and
``load_fp8_checkpoint`` for built, parallelized ``nn.Module``s."""

from .families import Family, get_family, get_key_mapper, list_key_mappers, register_family, register_key_mapper
from .fsdp import fully_shard_layers
from .keymap import Chain, FusedExperts, KeyMapper, Part, Renames, Tied
from .load import ModelLoadReport, load_fp8_checkpoint

from .loadplan import LoadPlan, PartPlan, plan_load

__all__ = ["Chain", "Family", "fully_shard_layers", "FusedExperts", "KeyMapper", "LoadPlan", "ModelLoadReport", "Part",
           "PartPlan", "Renames", "Tied", "get_family", "get_key_mapper", "list_key_mappers", "load_fp8_checkpoint",
           "plan_load", "register_family", "register_key_mapper"]
