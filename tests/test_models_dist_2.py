"""load_fp8_checkpoint on two real gloo ranks (one pool for the module): real transformers models built
on meta and sharded with real FSDP2 / TP / PP stages / EP, checked bit for bit against the independent
reference (every rank's shards) and by logits against transformers' from_pretrained of a BF16 copy.
The bodies (tests/model_bodies.py) say which logits come from a sharded forward and which from the loaded
shards gathered to rank 0."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model_bodies as B
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist

# (family, fmt, options): every family, the VLM in both key layouts; Mistral-family checkpoints are
# per-tensor FP8 as the real ones are.
FAMILIES = [
    ("llama", "fp8_block", {}),
    ("mistral", "fp8_tensor", {}),
    ("ministral3", "fp8_tensor", {}),
    ("ministral3_vlm", "fp8_tensor", {"vlm_layout": "new"}),
    ("ministral3_vlm", "fp8_tensor", {"vlm_layout": "old"}),
    ("qwen3", "fp8_block", {}),
    ("qwen3_moe", "fp8_block", {}),
    ("deepseek_v3", "fp8_block", {}),
    ("mixtral", "fp8_block", {}),
]


def _id(case) -> str:
    return "-".join([case[0], case[1]] + [f"{v}" for v in case[2].values()])


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2)
    yield p
    p.close()


def _path(checkpoints, family, fmt="fp8_block", **kw) -> str:
    path = checkpoints(family, fmt, **kw)
    B.bf16_copy(path)  # written once here, read by the ranks
    return str(path)


@pytest.mark.parametrize("case", FAMILIES, ids=_id)
def test_fsdp2_every_family(pool, checkpoints, case):
    family, fmt, kw = case
    r0, r1 = pool.run(B.fsdp2_body, _path(checkpoints, family, fmt, **kw))
    assert r0["checked"] > 0 and r1["checked"] > 0
    assert r0["placements"] == ["(Shard(dim=0),)"]
    layers = {"qwen3_moe": 2, "deepseek_v3": 2, "mixtral": 2}.get(family, 3)
    extra = 2 if family == "ministral3_vlm" else 0  # the vision tower's 2 layers are groups too
    assert r0["groups"] == r1["groups"] == layers + extra + 1
    assert r0["missing"] == r0["unexpected"] == []
    if family == "deepseek_v3":  # transformers keeps the router in F32: its own FSDP unit, loaded exactly
        assert r0["f32_units"] == ["model.layers.1.mlp.gate"], r0["f32_units"]


def test_fsdp2_tied_embeddings(pool, checkpoints):
    """tie_word_embeddings=True: the checkpoint has no lm_head.weight; FSDP2 keeps the tie through
    to_empty (DTensor params are swapped in place) and the shared storage is filled once."""
    path = _path(checkpoints, "llama", "fp8_block", tie_word_embeddings=True)
    assert "lm_head.weight" not in json.loads((checkpoints("llama", "fp8_block", tie_word_embeddings=True)
                                               / "model.safetensors.index.json").read_text())["weight_map"]
    r0, r1 = pool.run(B.fsdp2_body, path)
    assert r0["tied"] and r1["tied"] and r0["checked"] > 0


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "mixtral"])
def test_tp2(pool, checkpoints, family):
    r0, r1 = pool.run(B.tp_body, _path(checkpoints, family))
    assert r0["logits"] == (2, 6, 1001) and r1["logits"] is None
    # vocab 1001 over 2 ranks: 501 + 500 rows of the vocab-parallel embeddings and lm_head
    assert r0["boxes"]["lm_head.weight"] == (0, 501, 1001) and r1["boxes"]["lm_head.weight"] == (501, 1001, 1001)
    for key, (a, b, n) in r1["boxes"].items():
        if key.endswith("gate_up_proj"):  # rank 1 holds only up rows of [E, 2I, H]
            assert (a, b) == (n // 2, n), key
            assert r0["boxes"][key] == (0, n // 2, n)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_pp2_stages_of_2_and_3_layers(pool, checkpoints, family):
    r0, r1 = pool.run(B.pp_body, _path(checkpoints, family, num_hidden_layers=5), 2)
    assert r0["layers"] == ["0", "1"] and r1["layers"] == ["2", "3", "4"]
    assert r0["groups"] == r1["groups"] == 4  # stage 0: 2 layers + rest, padded to stage 1's 3 + rest
    assert r0["logits"] == (2, 6, 1001)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_ep2_dtensor_experts_uneven(pool, checkpoints, family):
    r0, r1 = pool.run(B.ep_dtensor_body, _path(checkpoints, family))
    assert r0["local_experts"] == [3] and r1["local_experts"] == [2]  # 5 experts: Shard(0) gives 3 + 2
    assert r0["logits"] == (2, 6, 1001)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_ep2_plain_expert_ranges(pool, checkpoints, family):
    r0, r1 = pool.run(B.ep_plain_body, _path(checkpoints, family))
    assert r0["expert_range"] == (0, 5) and r1["expert_range"] == (2, 5)
    assert r0["logits"] == (2, 6, 1001) and r0["quantized"] < r0["checked"]


def test_missing_on_one_rank_fails_on_every_rank(pool, checkpoints):
    path = _path(checkpoints, "llama")
    extra = {1: ("model.layers.1.mlp.extra_scale", (7,))}
    results = pool.run(B.error_body, path, extra)
    assert [r["error"] for r in results] == ["DestinationError", "DestinationError"]
    assert all(r["ours"] and "model.layers.1.mlp.extra_scale" in r["message"] and "examples=" in r["message"]
               for r in results)
    r0, r1 = pool.run(B.error_body, path, extra, False)
    assert r0["error"] is None and r0["missing"] == [] and r1["missing"] == ["model.layers.1.mlp.extra_scale"]


def test_different_problems_on_each_rank_make_one_error(pool, checkpoints):
    extra = {0: ("model.layers.0.mlp.extra_a", (3,)), 1: ("model.layers.2.self_attn.extra_b", (7,))}
    results = pool.run(B.error_body, _path(checkpoints, "llama"), extra)
    assert [r["error"] for r in results] == ["DestinationError", "DestinationError"]
    assert results[0]["message"] == results[1]["message"]
    assert "model.layers.0.mlp.extra_a" in results[0]["message"] and "extra_b" in results[0]["message"]


def test_unexpected_checkpoint_tensor(pool, checkpoints, tmp_path):
    src = checkpoints("llama", "fp8_block")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.surplus.weight"
    f = dst / idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(f)
    tensors[name] = torch.ones(4, 4, dtype=torch.bfloat16)
    save_file(tensors, f, metadata={"format": "pt"})
    idx["weight_map"][name] = f.name
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    results = pool.run(B.error_body, str(dst))
    assert [r["error"] for r in results] == ["DestinationError", "DestinationError"]
    assert all("unexpected" in r["message"] and name in r["message"] for r in results)
    r0, r1 = pool.run(B.error_body, str(dst), None, False)
    assert r0["unexpected"] == r1["unexpected"] == [name] and r0["missing"] == []
