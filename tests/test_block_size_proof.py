"""A declared block size is proven by the stored scale grids, not guessed: a size that gives the same ceil grids
as its neighbours but different values is refused (issue 13: [129, 129] / [112, 128] on a 128-block checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import streaming_adapters as sa
from helpers import poisoned_like
from reference import reference_state_dict
from streaming_adapters.checkpoint.index import TensorInfo
from streaming_adapters.errors import ScaleLayoutError
from streaming_adapters.formats.base import grid_shape, prove_block_sizes


def _pair(shape, block):
    info = TensorInfo("m.weight", "f.safetensors", "F8_E4M3", tuple(shape), 0, 0)
    return info, tuple(block), grid_shape(tuple(shape), tuple(block))


@pytest.mark.parametrize("shapes,block,ok", [
    # DeepSeek-V3: 7168 x 2048 with a 56 x 16 grid.  129 and 130 give the same grid; 7168 = 56 x 128 proves 128.
    ([(7168, 2048)], (128, 128), True),
    ([(7168, 2048)], (129, 129), False),
    ([(7168, 2048)], (130, 128), False),
    ([(7168, 2048)], (128, 129), False),
    # 576 rows (kv_a_proj_with_mqa, a 5-row grid) alone: 116..143 fit; 128 is the only power of two there.
    ([(576, 7168)], (128, 128), True),
    ([(576, 7168)], (120, 128), False),
    # A real 129-block export is proven by its own exact multiple (7224 = 56 x 129; 128 would give 57 rows).
    ([(7224, 7224)], (129, 129), True),
    # The grid is unique: ceil(d / b) = 2 only for b = 3 when d = 5 ... (5 / 2 rounds up to 3, 5 / 4 to 2).
    ([(5, 6), (9, 6)], (3, 3), True),
    # Every weight is one block along a dim: any size >= the dim gives the same values, nothing to prove.
    ([(64, 100)], (128, 128), True),
    # Per-tensor (block = shape) and per-channel (1, K) blocks are proven by construction.
    ([(320, 200)], (320, 200), True),
    ([(320, 200)], (1, 200), True),
    # Stacked experts: the leading block of 1 is an exact multiple.
    ([(5, 320, 256)], (1, 128, 128), True),
])
def test_prove_block_sizes(shapes, block, ok):
    pairs = [_pair(s, block) for s in shapes]
    if ok:
        prove_block_sizes(pairs, "config.json")
    else:
        with pytest.raises(ScaleLayoutError, match="not proven by the stored scales") as e:
            prove_block_sizes(pairs, "config.json")
        assert "what to do:" in str(e.value) and "config.json" in str(e.value)


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama", "fp8_block"), dst)
    return dst


def _set_qc(path, **kv):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(kv)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("bs", [[129, 129], [112, 128], [128, 159], [107, 128]])
def test_a_wrong_block_size_with_the_same_grids_is_refused(ckpt, bs):
    # The fixture's weights are 320 / 200 / 64 wide: every block in 107..159 gives the same 3 x 2 grids.
    _set_qc(ckpt, weight_block_size=bs)
    with pytest.raises(ScaleLayoutError, match="not proven") as e:
        sa.get_adapter(ckpt).plan
    assert str(ckpt / "config.json") in str(e.value) and "107..159" in str(e.value)


def test_the_true_block_size_loads_exactly(ckpt):
    w = "model.layers.1.mlp.down_proj.weight"
    sd = {w: poisoned_like((320, 200))}
    sa.load_fp8_state_dict(sd, ckpt)
    assert torch.equal(sd[w], reference_state_dict(ckpt)[w])


@pytest.mark.parametrize("bs", [[0, 128], [128, "128"], [True, 128], [128.0, 128], [128], "128", None])
def test_block_size_that_is_not_two_positive_ints(ckpt, bs):
    _set_qc(ckpt, weight_block_size=bs)
    if bs is None:  # no block size: the per-tensor adapter, whose grids do not match these scales
        with pytest.raises(sa.errors.CheckpointError):
            sa.get_adapter(ckpt).plan
        return
    with pytest.raises(ScaleLayoutError, match="weight_block_size") as e:
        sa.get_adapter(ckpt).plan
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("weights,match", [
    ({"strategy": "block", "block_structure": [0, 128]}, "block_structure"),
    ({"strategy": "block", "block_structure": ["a", 128]}, "block_structure"),
    ({"strategy": "block", "block_structure": [128.5, 128]}, "block_structure"),
    ({"strategy": "group", "group_size": 0}, "group_size"),
    ({"strategy": "group", "group_size": "128"}, "group_size"),
    ({"strategy": "group", "group_size": True}, "group_size"),
])
def test_compressed_tensors_block_sizes(checkpoints, tmp_path, weights, match):
    dst = tmp_path / "ct"
    shutil.copytree(checkpoints("llama", "ct_block"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"].update(weights)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaleLayoutError, match=match):
        sa.get_adapter(dst).plan


@pytest.mark.parametrize("groups", [["g"], "g", {"group_0": 3}, {"group_0": {"targets": "Linear"}},
                                    {"group_0": {"targets": ["Linear"], "weights": [8]}}])
def test_compressed_tensors_config_groups_of_the_wrong_json_type(checkpoints, tmp_path, groups):
    dst = tmp_path / "ct"
    shutil.copytree(checkpoints("llama", "ct_block"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["config_groups"] = groups
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaleLayoutError, match="config_groups"):
        sa.get_adapter(dst).plan


def test_compressed_tensors_target_that_is_not_a_regex(checkpoints, tmp_path):
    dst = tmp_path / "ct"
    shutil.copytree(checkpoints("llama", "ct_block"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["targets"] = ["re:model.layers.(", "Linear"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaleLayoutError, match="not a valid regular expression"):
        sa.get_adapter(dst).plan


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "ministral3_vlm"])
def test_every_fixture_family_proves_its_128_block(checkpoints, family):
    # 320 / 200 / 96 / 576-wide weights: proven by an exact multiple (256, 384, 512, 1024) or, where every dim
    # is awkward (llama: 320, 200, 64), by 128 being the only power of two the grids allow.  (All 109 fixture
    # variants of testing/fixtures.py were checked once by hand: every one plans.)
    plan = sa.get_adapter(checkpoints(family, "fp8_block")).plan
    blocks = {lt.scale.block[-2:] for lt in plan.logical.values() if lt.scale is not None}
    assert blocks == {(128, 128)}


@pytest.mark.parametrize("how", ["no config.json", "no quantization_config"])
def test_fp8_tensors_without_a_quantization_config_name_the_config(ckpt, how):
    cfg = ckpt / "config.json"
    if how == "no config.json":
        cfg.unlink()
    else:
        c = json.loads(cfg.read_text())
        c.pop("quantization_config")
        cfg.write_text(json.dumps(c))
    with pytest.raises(sa.errors.UnknownFormatError, match="stores FP8 tensors but") as e:
        sa.get_adapter(ckpt).plan
    assert str(cfg) in str(e.value) and "what to do:" in str(e.value)
