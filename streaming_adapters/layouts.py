"""Parallel layouts of a checkpoint's tensors, by name: which rank holds which box.

Used by the ``load_check`` recipe (build real DTensors in the requested layout and load into them) and by
the pre-flight planner (the same boxes, computed without allocating anything).  The rules are those of a
typical TP/FSDP/PP/EP plan for HF decoder models:

* TP: column-parallel ``Shard(0)`` for q/k/v, gate/up, w1/w3, MLA q_a/q_b/kv_a/kv_b, embeddings and
  lm_head (vocab-parallel); row-parallel ``Shard(1)`` for o_proj, down_proj, w2; 1-D tensors (norms,
  biases) and MoE routers replicated;
* dp_shard: FSDP2-style ``Shard(0)`` of every tensor over the data-parallel mesh dim, applied to the TP
  shard (FSDP-over-TP: DTensor calls it ``_StridedShard``);
* PP: decoder layers in ``pp`` contiguous stages; embeddings on the first stage, final norm and lm_head
  on the last;
* EP: experts split in ``ep`` contiguous ranges; an expert's tensors are held whole by its ranks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .models.families import Family, get_family

ROWWISE = re.compile(r"(o_proj|down_proj|\.w2|out_proj|dense_4h_to_h)\.weight$")
# Deprecated: decoder layers and experts come from the family (``Family.layer_of`` / ``expert_of``).
EXPERT = re.compile(r"\.experts\.(\d+)\.")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def _family(family: Family | None) -> Family:
    return family if family is not None else get_family()


def counts(names, family: Family | None = None) -> tuple[int, int]:
    """(decoder layers, experts per layer) of a checkpoint's tensor names, by the family's layout."""
    fam = _family(family)
    layers = [li[1] for n in names if (li := fam.layer_of(n)) is not None]
    experts = [e for n in names if (e := fam.expert_of(n)) is not None]
    return 1 + max(layers, default=0), 1 + max(experts, default=0)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp_shard: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.dp_shard * self.pp * self.ep

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh order (outer -> inner): pp, ep, dp_shard, tp."""
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp_shard
        ep = (rank // (self.tp * self.dp_shard)) % self.ep
        pp = rank // (self.tp * self.dp_shard * self.ep)
        return {"pp": pp, "ep": ep, "dp_shard": dp, "tp": tp}


def tp_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """The dim TP shards for this tensor, or None (replicated)."""
    if len(shape) != 2 or "norm" in name or ".mlp.gate." in name or name.endswith("gate.weight") and ".mlp." in name:
        return None
    return 1 if ROWWISE.search(name) else 0


def stage_of(name: str, num_layers: int, pp: int, family: Family | None = None) -> int:
    layer = _family(family).layer_of(name)
    if layer is not None:
        return min(pp - 1, layer[1] * pp // max(1, num_layers))
    return 0 if "embed" in name else pp - 1


def expert_owner(name: str, num_experts: int, ep: int, family: Family | None = None) -> int | None:
    e = _family(family).expert_of(name)
    if e is None or ep == 1:
        return None
    return min(ep - 1, e * ep // max(1, num_experts))


def chunk_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """torch.chunk / DTensor Shard semantics: ceil-sized chunks, the last ones possibly short or empty."""
    size = math.ceil(n / parts) if parts else n
    a = min(n, i * size)
    return a, min(n, a + size)


def local_box(name: str, shape: tuple[int, ...], layout: Layout, rank: int, num_layers: int,
              num_experts: int, family: Family | None = None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box (start, length) of ``name`` held by ``rank``, or None if the rank holds none of it."""
    c = layout.coords(rank)
    if stage_of(name, num_layers, layout.pp, family) != c["pp"]:
        return None
    owner = expert_owner(name, num_experts, layout.ep, family)
    if owner is not None and owner != c["ep"]:
        return None
    start, length = [0] * len(shape), list(shape)
    d = tp_dim(name, shape)
    if d is not None and layout.tp > 1:
        a, b = chunk_range(shape[d], layout.tp, c["tp"])
        start[d], length[d] = a, b - a
    if len(shape) >= 1 and layout.dp_shard > 1:
        a, b = chunk_range(length[0], layout.dp_shard, c["dp_shard"])
        start[0], length[0] = start[0] + a, b - a
    return tuple(start), tuple(length)


def make_mesh(layout: Layout, device):
    """The ``(pp, ep, dp_shard, tp)`` mesh, its ``(dp_shard, tp)`` sub-mesh for this rank, and one tiny
    DTensor made on it: the first DTensor of a process initialises ~34 MiB of DTensor dispatch state
    (measured, torch 2.13 CPU), which belongs to the process baseline, not to a load."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh(torch.device(device).type, (layout.pp, layout.ep, layout.dp_shard, layout.tp),
                            mesh_dim_names=("pp", "ep", "dp_shard", "tp"))
    sub = mesh["dp_shard", "tp"]
    DTensor.from_local(torch.zeros(1, device=device), sub, [Replicate(), Replicate()], run_check=False)
    return sub


def build_state_dict(logical: dict, layout: Layout, rank: int, device, dtype=None, fill: float = float("nan"),
                     mesh=None, family: Family | None = None):
    """Real DTensors (on the ``(dp_shard, tp)`` sub-mesh of the rank's pp/ep group) for every tensor the
    rank holds, NaN-filled so a missed element shows.  Returns ``{name: DTensor}`` and ``{name: box}``."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    num_layers, num_experts = counts(logical, family)
    sub = mesh if mesh is not None else make_mesh(layout, device)
    sd, boxes = {}, {}
    for name, lt in logical.items():
        box = local_box(name, lt.shape, layout, rank, num_layers, num_experts, family)
        if box is None:
            continue
        d = tp_dim(name, lt.shape)
        tp_pl = Shard(d) if d is not None and layout.tp > 1 else Replicate()
        if layout.dp_shard > 1 and lt.shape:
            dp_pl = _StridedShard(0, split_factor=layout.tp) if d == 0 and layout.tp > 1 else Shard(0)
        else:
            dp_pl = Replicate()
        want = dtype or (torch.bfloat16 if lt.scale is not None else lt.dtype)
        local = torch.full(box[1], fill, dtype=want, device=device) if want.is_floating_point else \
            torch.zeros(box[1], dtype=want, device=device)
        stride = tuple(int(torch.tensor(lt.shape[i + 1:]).prod()) for i in range(len(lt.shape)))
        sd[name] = DTensor.from_local(local, sub, [dp_pl, tp_pl], run_check=False, shape=torch.Size(lt.shape),
                                      stride=stride)
        boxes[name] = box
    return sd, boxes
