"""Four real gloo ranks: TP=2 x FSDP=2 with real parallelize_module + fully_shard (FSDP-over-TP gives
_StridedShard), and a 2-D mesh whose shards start inside blocks in both dims."""

from __future__ import annotations

import pytest

import dist_bodies as B
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(4)
    yield p
    p.close()


@pytest.mark.parametrize("family,fmt", [("llama", "fp8_block"), ("qwen3", "ct_block"), ("mistral", "fp8_tensor")])
def test_tp2_x_fsdp2_strided_shard(pool, checkpoints, family, fmt):
    results = pool.run(B.tp_fsdp_model_load, str(checkpoints(family, fmt)))
    checked, placements, line = results[0]
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in placements
    assert "(Shard(dim=0), Shard(dim=1))" in placements
    assert all(r[0] > 0 for r in results) and "4 rank(s)" in line


@pytest.mark.parametrize("fmt", ["fp8_block", "ct_group", "fp8_block_e8m0"])
def test_2d_mesh_unaligned_shards(pool, checkpoints, fmt):
    assert all(n > 0 for n in pool.run(B.mesh2d_load, str(checkpoints("deepseek_v3", fmt))))


def test_uneven_vocab_and_tp4(pool, checkpoints):
    # vocab 1001 over 4 ranks: 251, 251, 251, 248 rows (ceil chunks); kv heads 64 rows over 4 ranks.
    results = pool.run(B.tp_load, str(checkpoints("llama", "fp8_block")))
    assert all(r[0] > 0 for r in results)


@pytest.mark.parametrize("family,fmt", [("qwen3_moe", "compressed-tensors"), ("llama", "modelopt")])
def test_conversion_bytes_identical_to_world_1(pool, checkpoints, tmp_path, family, fmt):
    from streaming_adapters.convert import convert_checkpoint

    src = checkpoints(family, "fp8_block")
    # Different step sizes too: the split of work must not change a byte.
    convert_checkpoint(src, tmp_path / "w1", target="nvfp4", format=fmt, step_bytes=1 << 30, progress=False)
    results = pool.run(B.convert, str(src), str(tmp_path / "w4"), "nvfp4", fmt, 1 << 17)
    assert all(r[0] == 4 for r in results) and all(r[1] > 0 for r in results)
    B.same_tree(tmp_path / "w1", tmp_path / "w4")
