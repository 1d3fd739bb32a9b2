"""Families own their data (fused groups, decoder layers, experts) and one load plan serves every loader.

Fused groups are checked against the rule they replace (bare leaf names anywhere) on the real checkpoint names of
every fixture family; the docs' override example is run as written and converts a real checkpoint; the ranks'
agreement runs on two real gloo ranks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import loadplan_bodies as LB
import model_bodies as B
from reference import load_all
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.convert.plan import FUSED_MEMBERS, _layer_key, _unit_key
from streaming_adapters.formats import get_adapter
from streaming_adapters.layouts import Layout, counts, local_box
from streaming_adapters.models import Family, get_family, plan_load
from streaming_adapters.models.families import dense
from streaming_adapters.models.loadplan import REST, bound_parts, state_dict_destinations
from streaming_adapters.testing.dist_pool import ProcessGroupPool
from streaming_adapters.testing.fixtures import FAMILIES, disk_layout, is_quantizable, tiny_config

DOCS = Path(__file__).parent.parent / "docs" / "models.md"


def _legacy_key(name: str):
    """The rule the families replace: a bare leaf name of FUSED_MEMBERS, anywhere (convert/plan.py before)."""
    parent, _, leaf = name[: -len(".weight")].rpartition(".")
    return next(((parent, gi) for gi, members in enumerate(FUSED_MEMBERS) if leaf in members), None)


def _partition(names, key) -> set[frozenset]:
    groups: dict = {}
    for n in names:
        groups.setdefault(key(n) or ("single", n), []).append(n)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("family,vlm_layout", [(f, "new") for f in FAMILIES] + [("ministral3_vlm", "old")])
def test_fused_groups_equal_the_old_rule_on_real_names(family, vlm_layout):
    config = tiny_config(family)
    layout = disk_layout(config, vlm_layout)
    names = [n for n, shape in layout.items() if is_quantizable(n, shape)]
    fam = get_family(config)
    assert fam.name != "__default__"
    got = _partition(names, fam.fused_group)
    assert got == _partition(names, _legacy_key)
    assert any(len(g) > 1 for g in got)  # the check compares real groups
    # Every name's layer, as the conversion orders steps: the index the old regex found.
    for n in layout:
        m = re.search(r"\.layers\.(\d+)\.", n)
        assert _layer_key(n, fam) == (0 if "embed" in n else 2 if m is None else 1, int(m.group(1)) if m else 0)
    # The default family (an unknown model_type) groups as the old rule did.
    assert _partition(names, _unit_key) == _partition(names, _legacy_key)


def test_layer_of_expert_of_and_fused_paths():
    fam = get_family({"model_type": "mistral3"})
    assert fam.layer_of("model.language_model.layers.3.mlp.up_proj.weight") == ("model.language_model.layers", 3)
    assert fam.layer_of("model.vision_tower.transformer.layers.0.attention.q_proj.weight") == \
        ("model.vision_tower.transformer.layers", 0)
    assert fam.layer_of("layers.7.attention.wq.weight") == ("layers", 7)  # torchtitan / pipeline stage names
    assert fam.layer_of("model.embed_tokens.weight") is None and fam.layer_of("lm_head.weight") is None
    moe = get_family({"model_type": "qwen3_moe"})
    assert moe.expert_of("model.layers.1.mlp.experts.4.down_proj.weight") == 4
    assert moe.expert_of("model.layers.1.mlp.experts.gate_up_proj") is None
    assert moe.fused_group("model.layers.1.mlp.experts.4.up_proj.weight") == ("model.layers.1.mlp.experts.4", 2)
    # Paths, not leaf names: an up_proj outside the group's path is alone.
    assert moe.fused_group("model.layers.1.mlp.other.up_proj.weight") is None
    mixtral = get_family({"model_type": "mixtral"})
    assert mixtral.fused_group("model.layers.0.block_sparse_moe.experts.2.w3.weight") == \
        ("model.layers.0.block_sparse_moe.experts.2", 1)
    assert mixtral.fused_group("model.layers.0.mlp.gate_proj.weight") is None  # not a Mixtral layout
    assert counts(["model.layers.4.mlp.experts.6.w1.weight", "model.layers.0.x.weight"], mixtral) == (5, 7)
    # The layouts' stages and expert owners follow the family's layer_of.
    box = local_box("layers.3.attention.wq.weight", (8, 8), Layout(pp=2), rank=1, num_layers=4, num_experts=1)
    assert box == ((0, 0), (8, 8))


def test_family_refuses_a_group_of_non_siblings():
    with pytest.raises(ValueError, match="sibling"):
        Family("bad", dense, fused=(("self_attn.q_proj", "mlp.up_proj"),))


def _global_scales(out: Path) -> dict[str, float]:
    return {k[: -len(".weight_global_scale")]: float(v.reshape(())) for k, v in load_all(out).items()
            if k.endswith(".weight_global_scale")}


def test_docs_family_data_example(checkpoints, tmp_path):
    """Runs docs/models.md's family-data example as written; a checkpoint of that model_type converts with gate
    and up scaled on their own, q/k/v still shared, every other byte as Llama's conversion writes it."""
    block = re.search(r"<!-- example: family-data -->\s*```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) < 10
    exec(compile(block, str(DOCS), "exec"), {})
    src = tmp_path / "my_llama"
    shutil.copytree(checkpoints("llama", "fp8_block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "my_llama"}))
    assert get_family(cfg | {"model_type": "my_llama"}).fused == (("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj"),)
    convert_checkpoint(src, tmp_path / "mine", target="nvfp4", progress=False)
    convert_checkpoint(checkpoints("llama", "fp8_block"), tmp_path / "llama", target="nvfp4", progress=False)
    mine, llama = _global_scales(tmp_path / "mine"), _global_scales(tmp_path / "llama")
    for i in range(3):
        mlp, attn = f"model.layers.{i}.mlp", f"model.layers.{i}.self_attn"
        assert llama[f"{mlp}.gate_proj"] == llama[f"{mlp}.up_proj"]
        assert mine[f"{mlp}.gate_proj"] != mine[f"{mlp}.up_proj"]
        assert len({mine[f"{attn}.{p}_proj"] for p in "qkv"}) == 1
        assert mine[f"{attn}.q_proj"] == llama[f"{attn}.q_proj"]


def test_part_of_layer_is_what_a_layer_streamer_fills(checkpoints):
    path = checkpoints("qwen3_moe", "fp8_block")
    model = B.meta_model(path)
    B.materialize(model)
    index = CheckpointIndex.open(path)
    logical = get_adapter(path, index=index).plan.logical
    fam = get_family(index.config)
    sd = model.state_dict(keep_vars=True)
    plan = plan_load(state_dict_destinations(sd), fam.mapper(), logical, fam)
    assert not plan.problems and not plan.missing
    assert [p.layer for p in plan.parts] == [("model.layers", 0), ("model.layers", 1), REST]
    one = plan.part_of(1)
    assert sorted(one.model_keys) == sorted(k for k in sd if k.startswith("model.layers.1."))
    assert {r.model_key for r in one.requests} == set(one.model_keys)
    # Fused experts gate_up_proj [E, 2I, H]: gate and up of each of the 5 experts, views of the one tensor.
    gate_up = [r for r in one.requests if r.model_key.endswith("experts.gate_up_proj")]
    assert len(gate_up) == 10 and all(r.view.untyped_storage().data_ptr() ==
                                      sd["model.layers.1.mlp.experts.gate_up_proj"].untyped_storage().data_ptr()
                                      for r in gate_up)
    # A byte bound splits a layer into several parts (whole clusters); part_of still answers the whole layer.
    bounded = bound_parts(plan.parts, 1 << 16, logical)
    assert len(bounded) > len(plan.parts)
    assert all(p.temporary_bytes(logical) <= 1 << 16 or len(p.model_keys) == 1 for p in bounded)
    plan.parts = bounded
    assert sorted(plan.part_of(1).model_keys) == sorted(one.model_keys)
    assert plan.part_of(9).model_keys == []


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2)
    yield p
    p.close()


@pytest.mark.dist
def test_ranks_agree_on_the_number_of_parts(pool):
    r0, r1 = pool.run(LB.agree_parts_body, [(2, 1), (3, 1)], True)  # pipeline stages of 2 and 3 layers
    assert len(r0) == len(r1) == 3 and r0[2] == []  # padded with an empty load
    r0, r1 = pool.run(LB.agree_parts_body, [(2, 2), (3, 1)], False)  # NeMo: split the largest part instead
    assert len(r0) == 3 and all(r0) and sorted(k for p in r0 for k in p) == sorted(k for p in LB._parts(2, 2)
                                                                                   for k in p.model_keys)
    r0, r1 = pool.run(LB.agree_parts_body, [(1, 1), (3, 1)], False)  # rank 0 cannot make 3 parts
    assert r0 == r1 and r0[0] == "DestinationError" and "rank 0 can make only 1" in r0[1]


@pytest.mark.dist
def test_one_rank_error_is_every_ranks_error(pool):
    r0, r1 = pool.run(LB.agree_mapping_body, 1, None)
    assert r0 == r1 and r0[0] == "CheckpointError" and "header of shard 2 is truncated" in r0[1]
    r0, r1 = pool.run(LB.agree_mapping_body, None, 0)
    assert r0 == r1 and r0[0] == "DestinationError" and "model.layers.0.mlp.up_proj.weight" in r0[1]
    r0, r1 = pool.run(LB.agree_mapping_body, None, None)
    assert r0 == r1 == ["t2"]  # no rank uses t2: unexpected, logged by NeMo, an error with strict loading
