"""load_fp8_checkpoint on four real gloo ranks (one pool for the module): TP=2 x FSDP2=2 with real
parallelize_module + fully_shard (FSDP over TP gives _StridedShard), and TP=4 over fused experts whose
shards straddle the gate/up boundary.  Values are checked on every rank against the independent
reference; logits come from the shards gathered (full_tensor) to rank 0 (see tests/model_bodies.py)."""

from __future__ import annotations

import pytest

import model_bodies as B
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(4)
    yield p
    p.close()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_tp2_x_fsdp2(pool, checkpoints, family):
    path = checkpoints(family, "fp8_block")
    B.bf16_copy(path)
    results = pool.run(B.tp_fsdp_body, str(path))
    assert all(r["checked"] > 0 for r in results)
    placements = results[0]["placements"]
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in placements  # colwise weights under FSDP
    assert "(Shard(dim=0), Shard(dim=1))" in placements                 # rowwise weights under FSDP
    if family == "qwen3_moe":
        assert "(Shard(dim=0), Shard(dim=2))" in placements             # experts' down_proj: E over dp, I over tp
    assert results[0]["logits"] == (2, 6, 1001) and "4 rank(s)" in results[0]["line"]


def test_tp4_expert_shards_straddle_gate_and_up(pool, checkpoints):
    """moe_intermediate_size 97: gate_up_proj has 194 rows, 49 per rank: rank 1 holds gate rows 49..96
    and up row 0; ranks 2 and 3 only up rows (the last one 47).  down_proj's 97 columns: 25/25/25/22."""
    path = checkpoints("qwen3_moe", "fp8_block", moe_intermediate_size=97)
    B.bf16_copy(path)
    results = pool.run(B.tp_body, str(path))
    boxes = [r["boxes"]["model.layers.0.mlp.experts.gate_up_proj"] for r in results]
    assert boxes == [(0, 49, 194), (49, 98, 194), (98, 147, 194), (147, 194, 194)]
    assert all(r["checked"] > 0 for r in results) and results[0]["logits"] == (2, 6, 1001)
    # vocab 1001 over 4 ranks, torch.chunk sizes: 251 + 251 + 251 + 248
    assert [r["boxes"]["lm_head.weight"][:2] for r in results] == [(0, 251), (251, 502), (502, 753), (753, 1001)]
