"""NeMo AutoModel 0.7.0 on two real gloo ranks, each layout built by NeMo from its own ``distributed:`` section
(FSDP2, TP, PP, EP) and PEFT: without the hook (what NeMo does today), with it (every local shard bit-equal
to the reference), and NeMo's load of the BF16 copy (the logits / pipeline losses the FP8 load must give)."""

from __future__ import annotations

import nemo_bodies as B
import pytest
import torch

from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pool():
    p = ProcessGroupPool(2, timeout_s=300)
    yield p
    p.close()


def run3(pool, path, layout, *, peft=False, without=True):
    """(with hook, without hook, BF16 copy) results, one list of per-rank dicts each."""
    copy = B.bf16_copy(path)
    hooked = pool.run(B.load_and_check, str(path), layout, hook=True, peft=peft)
    plain = pool.run(B.load_and_check, str(path), layout, hook=False, peft=peft) if without else None
    reference = pool.run(B.load_and_check, str(copy), layout, hook=True, peft=peft)
    return hooked, plain, reference


def assert_exact(results, layout):
    for r in results:
        p = r["params"]
        assert r["streaming_class"], r
        assert p["checked"] and not p["wrong"] and not p["codes"] and len(p["exact"]) == p["checked"], (layout, r)


def assert_same_out(a, b):
    for x, y in zip(a, b):
        if x["out"] is not None or y["out"] is not None:
            assert torch.equal(x["out"], y["out"]), (x["rank"], x["out"], y["out"])


def test_fsdp2(pool, nemo_checkpoints):
    hooked, plain, ref = run3(pool, nemo_checkpoints("llama"), "fsdp2")
    assert_exact(hooked, "fsdp2")
    assert_same_out(hooked, ref)
    for r in plain:  # NeMo today: every FP8 weight holds its codes, on every rank
        assert len(r["params"]["codes"]) == r["params"]["quantized"] == 21, r["params"]
        assert not torch.equal(r["out"], ref[0]["out"])


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tp2(pool, nemo_checkpoints, family):
    """TP shards of k_proj (128 rows) and the MLP (200 rows) start inside a 128-row scale block."""
    hooked, plain, ref = run3(pool, nemo_checkpoints(family), "tp2", without=family == "llama")
    assert_exact(hooked, "tp2")
    assert_same_out(hooked, ref)
    if plain is not None:
        assert all(len(r["params"]["codes"]) == 21 for r in plain)


def test_pp2_stages_agree_on_parts(pool, nemo_checkpoints):
    """3 layers on 2 stages: stage 0 holds 2 layers + embeddings, stage 1 one layer + norm + head, so they have
    3 and 2 natural parts; they agree on 3 (NeMo issues one dcp.load per part: a mismatch would hang)."""
    hooked, plain, ref = run3(pool, nemo_checkpoints("llama"), "pp2")
    assert_exact(hooked, "pp2")
    assert [r["stats"]["parts"] for r in hooked] == [3, 3]
    assert [r["params"]["checked"] for r in hooked] == [19, 11]
    assert_same_out(hooked, ref)  # the last stage's per-microbatch losses
    assert hooked[1]["out"] is not None and not torch.equal(plain[1]["out"], ref[1]["out"])


def test_pp2_tied_checkpoint(pool, nemo_checkpoints):
    """Tied checkpoint (no lm_head.weight) under PP: the last stage's head is read from the embeddings."""
    hooked, _, ref = run3(pool, nemo_checkpoints("llama", tie_word_embeddings=True), "pp2", without=False)
    assert_exact(hooked, "pp2 tied")
    assert_same_out(hooked, ref)


def test_ep2_deepseek_v3(pool, nemo_checkpoints):
    """DeepSeek-V3 (MLA, 576-row kv_a, 96-wide experts) with EP=2 through NeMo's own MoE adapter (its
    grouped-expert layout): exact with the hook.  Without it, NeMo's adapter dequantizes FSDP shards as if
    they started on a block boundary: rank 1's shards of q_a/q_b/kv_a/up projections come out wrong."""
    hooked, plain, ref = run3(pool, nemo_checkpoints("deepseek_v3", n_routed_experts=4), "ep2")
    assert_exact(hooked, "ep2")
    assert all(r["adapter"] == "StreamingFP8DeepSeekV3StateDictAdapter" for r in hooked)
    assert_same_out(hooked, ref)
    assert not plain[0]["params"]["wrong"] and plain[1]["params"]["wrong"], [r["params"]["wrong"] for r in plain]


def test_peft_lora_fsdp2(pool, nemo_checkpoints):
    hooked, plain, ref = run3(pool, nemo_checkpoints("llama"), "fsdp2", peft=True)
    assert_exact(hooked, "peft")
    assert all(r["params"]["lora"] > 0 for r in hooked)
    assert_same_out(hooked, ref)  # LoRA B starts at zero: the base model's logits
    assert all(len(r["params"]["codes"]) == 21 for r in plain)


def test_read_error_on_one_rank_raised_on_every_rank(pool, nemo_checkpoints, tmp_path):
    """A NaN scale in rows only rank 1 holds (FSDP2 shards down_proj's 320 rows 160/160; scale row 2 covers rows
    256-319): rank 1's part finish fails in the read core and rank 0 raises the same error instead of waiting
    in the next part's dcp.load."""
    import os

    from safetensors.torch import load_file, save_file

    src = nemo_checkpoints("llama")
    s = "model.layers.2.mlp.down_proj.weight_scale_inv"
    for f in src.iterdir():
        if f.is_file():
            os.link(f, tmp_path / f.name)
    shard = next(f for f in tmp_path.glob("*.safetensors") if s in load_file(f))
    tensors = load_file(shard)
    tensors[s] = tensors[s].clone()
    tensors[s][2, 1] = float("nan")
    shard.unlink()  # a new file, not a write through the hard link into the shared fixture
    save_file(tensors, shard)
    results = pool.run(B.load_error, str(tmp_path), "fsdp2")
    assert [r[0] for r in results] == ["ScaleLayoutError", "ScaleLayoutError"], results
    assert all("not finite" in r[1] and s in r[1] for r in results), results
