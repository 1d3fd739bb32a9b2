"""Two real gloo ranks (started once for the module): TP, FSDP2, PP, EP, and errors on every rank."""

from __future__ import annotations

import json
import shutil

import pytest

from safetensors.torch import load_file, save_file

import dist_bodies as B
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2)
    yield p
    p.close()


@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_block_u8", "fp8_tensor", "ct_channel", "ct_group", "ct_block",
                                 "modelopt", "fbgemm"])
def test_tp2_column_and_row_parallel(pool, checkpoints, fmt):
    path = str(checkpoints("llama", fmt))
    (checked0, line, bytes0), (checked1, _, bytes1) = pool.run(B.tp_load, path)
    assert checked0 > 0 and checked1 > 0
    assert "2 rank(s)" in line


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral", "ministral3"])
def test_tp2_families(pool, checkpoints, family):
    fmt = "fp8_tensor" if family == "ministral3" else "fp8_block"
    results = pool.run(B.tp_load, str(checkpoints(family, fmt)), 1 << 16, "pread")
    assert all(r[0] > 0 for r in results)


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_tp2_through_the_gpu_pipeline_logic(pool, checkpoints, backend):
    """The GPU pipeline's thread/buffer-ring logic, run on CPU (streams and events are no-ops there): the
    same bits as the direct path, with 3 reader threads and chunks much smaller than the tensors."""
    for family, fmt in (("deepseek_v3", "fp8_block"), ("llama", "ct_group")):
        results = pool.run(B.tp_load, str(checkpoints(family, fmt)), 1 << 16, backend, True)
        assert all(r[0] > 0 for r in results)


def test_tp2_reads_about_its_shard_only(pool, checkpoints):
    path = checkpoints("llama", "fp8_block")
    (c0, _, b0), (c1, _, b1) = pool.run(B.tp_load, str(path))
    total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    # Norms are replicated (read by both) and scale windows overlap; the rest is split.
    assert b0 + b1 < 1.15 * total, (b0, b1, total)
    assert abs(b0 - b1) < 0.2 * total


def test_tp2_matches_torch_quantized_reader(pool, checkpoints):
    n = pool.run(B.tp_matches_torch_quantized_reader, str(checkpoints("deepseek_v3", "fp8_block")))
    assert n[0] > 30


@pytest.mark.parametrize("family,fmt", [("llama", "fp8_block"), ("qwen3", "ct_channel"), ("ministral3", "fp8_tensor")])
def test_fsdp2_real_fully_shard(pool, checkpoints, family, fmt):
    (checked, placements, quantized), _ = pool.run(B.fsdp_model_load, str(checkpoints(family, fmt)))
    assert placements == ["(Shard(dim=0),)"]
    assert quantized == 21 and checked > 0


def test_pp2_ranks_hold_different_layers(pool, checkpoints):
    (keys0, n0), (keys1, n1) = pool.run(B.pp_load, str(checkpoints("llama", "fp8_block")))
    assert not set(keys0) & set(keys1)
    assert any("layers.0." in k for k in keys0) and any("lm_head" in k for k in keys1)
    assert n0 == len(keys0) and n1 == len(keys1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_experts_sharded_across_ranks(pool, checkpoints, family):
    (e0, q0), (e1, q1) = pool.run(B.ep_load, str(checkpoints(family, "fp8_block")))
    assert e0 == [0, 1, 2] and e1 == [3, 4]


def _mutated(checkpoints, tmp_path, fn):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama", "fp8_block"), dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    fn(dst, idx)
    return str(dst)


def test_validation_error_raised_on_every_rank(pool, checkpoints, tmp_path):
    s = "model.layers.2.mlp.down_proj.weight_scale_inv"

    def drop_scale(dst, idx):
        f = dst / idx["weight_map"][s]
        t = load_file(f)
        t.pop(s)
        save_file(t, f)
        idx["weight_map"].pop(s)
        (dst / "model.safetensors.index.json").write_text(json.dumps(idx))

    path = _mutated(checkpoints, tmp_path, drop_scale)
    # Rank 1 asks for nothing from layer 2; it must fail all the same, with the same error.
    keys = {0: ["model.layers.2.mlp.down_proj.weight"], 1: []}
    results = pool.run(B.expect_error, path, keys)
    assert [r[0] for r in results] == ["MissingScaleError", "MissingScaleError"]
    assert all(r[2] and "model.layers.2.mlp.down_proj.weight" in r[1] for r in results)


def test_read_error_on_one_rank_raised_on_every_rank(pool, checkpoints, tmp_path):
    s = "model.layers.2.mlp.down_proj.weight_scale_inv"

    def nan_scale(dst, idx):
        f = dst / idx["weight_map"][s]
        t = load_file(f)
        t[s] = t[s].clone()
        t[s][2, 1] = float("nan")
        save_file(t, f)

    path = _mutated(checkpoints, tmp_path, nan_scale)
    # Only rank 1 reads the bad tensor; the error surfaces inside DCP's read phase on rank 1 alone.
    keys = {0: ["model.layers.0.mlp.down_proj.weight"], 1: ["model.layers.2.mlp.down_proj.weight"]}
    results = pool.run(B.expect_error, path, keys)
    assert [r[0] for r in results] == ["ScaleLayoutError", "ScaleLayoutError"], results
    assert all(r[2] and "not finite" in r[1] and s in r[1] for r in results)


@pytest.mark.parametrize("target,fmt", [("bf16", None), ("nvfp4", "compressed-tensors"), ("nvfp4", "modelopt")])
def test_conversion_bytes_identical_to_world_1(pool, checkpoints, tmp_path, target, fmt):
    from streaming_adapters.convert import convert_checkpoint

    src = checkpoints("deepseek_v3", "fp8_block")
    convert_checkpoint(src, tmp_path / "w1", target=target, format=fmt, step_bytes=1 << 18, progress=False)
    results = pool.run(B.convert, str(src), str(tmp_path / "w2"), target, fmt, 1 << 18)
    assert [r[0] for r in results] == [2, 2]
    # The ranks read disjoint pieces: together about the checkpoint once (scale windows overlap a little).
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert sum(r[1] for r in results) < 1.05 * total and min(r[1] for r in results) > 0.2 * total
    B.same_tree(tmp_path / "w1", tmp_path / "w2")
