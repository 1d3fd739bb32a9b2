"""NeMo AutoModel 0.7.0 in one process (the pytest process, CPU shim applied): what NeMo does to an FP8
checkpoint without the hook, what it does with it, every registered format, tied checkpoints, bounded parts,
and that non-FP8 configs are untouched."""

from __future__ import annotations

import nemo_bodies as B
import pytest
import torch


def test_without_hook_nemo_copies_fp8_codes_into_bf16(nemo_checkpoints):
    """NeMo's own Llama class, FP8 checkpoint, no hook: every FP8 weight holds its *codes* cast to BF16 (the
    scales are dropped by a non-strict load), up to 448 where the reference is a few units.  This asserts the
    bug as it is: the day NeMo dequantizes, this test fails and says so."""
    path = nemo_checkpoints("llama")
    r = B.load_and_check(path, hook=False)
    p = r["params"]
    assert r["class"] == "LlamaForCausalLM" and not r["streaming_class"]
    assert p["quantized"] == 21 and len(p["codes"]) == 21, p  # 3 layers x 7 projections
    assert set(p["exact"]) | set(p["codes"]) and not p["wrong"], p
    ref = B.bf16_copy(path)
    want = B.load_and_check(ref, hook=False)["out"]
    assert not torch.equal(r["out"], want)


@pytest.mark.parametrize("family, adapter", [
    ("llama", "StreamingFP8IdentityAdapter"),                  # NeMo's own class, HF names
    ("qwen3", "StreamingFP8IdentityAdapter"),
    ("mistral", "StreamingFP8IdentityAdapter"),                # transformers' class (NeMo leaves it to HF)
    ("mixtral", "StreamingFP8IdentityAdapter"),                # transformers' class, fused experts
    ("qwen3_moe", "StreamingFP8Qwen3MoeStateDictAdapter"),     # NeMo's class and MoE adapter (grouped experts)
    ("deepseek_v3", "StreamingFP8DeepSeekV3StateDictAdapter"),
])
def test_with_hook_exact_and_logits_of_bf16_copy(nemo_checkpoints, family, adapter):
    """With the hook: every tensor bit-equal to the reference, logits equal to NeMo's load of the BF16 copy."""
    path = nemo_checkpoints(family)
    r = B.load_and_check(path, hook=True)
    p = r["params"]
    assert r["streaming_class"] and r["adapter"] == adapter, r
    assert not p["codes"] and not p["wrong"] and len(p["exact"]) == p["checked"] >= 20, p
    copy = B.load_and_check(B.bf16_copy(path), hook=True)  # hook installed, BF16 config: NeMo's own path
    assert not copy["streaming_class"] and not (copy["adapter"] or "").startswith("StreamingFP8")
    assert not copy["params"]["wrong"]
    assert torch.equal(r["out"], copy["out"])


@pytest.mark.parametrize("fmt", ["fp8_block_e8m0", "fp8_block_u8", "fp8_tensor", "ct_channel", "ct_group",
                                 "ct_block", "ct_tensor", "modelopt", "fbgemm"])
def test_every_registered_format(nemo_checkpoints, fmt):
    path = nemo_checkpoints("llama", fmt)
    r = B.load_and_check(path, hook=True, logits=False)
    p = r["params"]
    assert r["streaming_class"] and not p["wrong"] and len(p["exact"]) == p["checked"] == 30, (fmt, p)


def test_tied_checkpoint(nemo_checkpoints):
    """A tied checkpoint has no lm_head.weight: NeMo ties the head to the embeddings, the load fills them once."""
    path = nemo_checkpoints("llama", tie_word_embeddings=True)
    r = B.load_and_check(path, hook=True)
    assert not r["params"]["wrong"] and r["params"]["exact"], r["params"]
    assert torch.equal(r["out"], B.load_and_check(B.bf16_copy(path), hook=True)["out"])


def test_parts_are_bounded_by_one_decoder_layer(nemo_checkpoints):
    """One part per decoder layer plus one for the rest; the read transient stays within one layer's FP8 codes
    and scales plus the dequantization scratch; a smaller max_part_bytes splits layers and stays exact."""
    import json

    from safetensors import safe_open

    import streaming_adapters.integrations.nemo as hook

    path = nemo_checkpoints("llama")
    r = B.load_and_check(path, hook=True, logits=False)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert r["stats"]["parts"] == layers + 1
    per_layer: dict[int, int] = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118 -- safe_open is not a mapping
                if ".layers." in k and (k.endswith("_scale_inv") or h.get_slice(k).get_dtype() == "F8_E4M3"):
                    t = h.get_tensor(k)
                    layer = int(k.split(".layers.")[1].split(".")[0])
                    per_layer[layer] = per_layer.get(layer, 0) + t.numel() * t.element_size()
    assert r["stats"]["peak_temporary_bytes"] <= max(per_layer.values()) + 8 * B.MiB, (r["stats"], per_layer)
    try:
        hook.configure(max_part_bytes=16 << 10)
        small = B.load_and_check(path, hook=True, logits=False)
    finally:
        hook.configure()
    assert small["stats"]["parts"] > layers + 1 and not small["params"]["wrong"], small["stats"]


def test_parts_read_through_the_core_not_host_temporaries(nemo_checkpoints):
    """NeMo's reader gets destinations with no boxes (it reads nothing, no temporary keys); each part's finish
    alone fills the model's shards through the read core, bit-exactly, with a transient bounded by
    ``chunk_bytes`` (staging + fp32 scratch), below one layer's FP8 codes (what the old host temporaries held)."""
    import streaming_adapters.integrations.nemo as hook

    path = nemo_checkpoints("llama")
    chunk = 64 << 10
    try:
        hook.configure(chunk_bytes=chunk)
        model = B.from_pretrained(path, None, hook=True)
    finally:
        hook.configure()
    stats = model.state_dict_adapter.sa_last_load
    assert not B.check_params(model, path)["wrong"]
    layer_codes = 2 * 320 * 320 + 2 * 320 * 160 + 3 * 320 * 200  # q/o + k/v (2 of 4 heads) + gate/up/down
    assert stats.quantized == 21 and stats.bytes_read >= 3 * layer_codes, stats
    assert 0 < stats.peak_temporary_bytes <= 5 * chunk + (8 << 10) < layer_codes, stats

    with torch.no_grad():
        for v in model.state_dict().values():
            v.zero_()
    parts = list(model.state_dict_adapter.iter_checkpoint_load_parts(model.state_dict()))
    assert len(parts) == 4
    for part in parts:
        assert part.temporary_checkpoint_keys == frozenset() and part.checkpoint_tensors
        assert all(t.__create_chunk_list__() == [] for t in part.checkpoint_tensors.values())
        part.finish()  # no dcp.load at all: finish reads the boxes itself
    p = B.check_params(model, path)
    assert not p["wrong"] and len(p["exact"]) == p["checked"] == 30, p


def test_non_fp8_configs_resolve_exactly_as_before(nemo_checkpoints):
    from nemo_automodel._transformers import model_init
    from transformers import AutoConfig

    B.setup_nemo(hook=True)
    hooked = model_init._resolve_custom_model_cls_for_config
    original = hooked._streaming_adapters_original
    for fam in ("llama", "mistral", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"):
        cfg = AutoConfig.from_pretrained(B.bf16_copy(nemo_checkpoints(fam)))
        assert hooked(cfg) is original(cfg), fam
        fp8 = AutoConfig.from_pretrained(nemo_checkpoints(fam))
        got = hooked(fp8)
        assert got is not original(fp8) and got._streaming_adapters_base in (original(fp8), got.__mro__[1]), fam


def test_whole_tensor_path_is_refused(nemo_checkpoints):
    """If NeMo ever asks the adapter for FP8 destinations (its non-parts path), it gets an error, not codes."""
    from streaming_adapters.errors import DestinationError

    model = B.from_pretrained(nemo_checkpoints("llama"), None, hook=True)
    with pytest.raises(DestinationError, match="load parts"):
        model.state_dict_adapter.to_hf(model.state_dict(), quantization=True)
    assert list(model.state_dict_adapter.to_hf({"a": torch.zeros(1)})) == ["a"]


def test_mismatched_checkpoint_fails_before_any_read(nemo_checkpoints, tmp_path):
    """A config that does not match the tensors (intermediate 256, checkpoint 200): an error naming the
    tensor and both shapes, raised while planning, not a silently partial model."""
    import json
    import os

    from streaming_adapters.errors import DestinationError

    src = nemo_checkpoints("llama")
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            os.link(f, tmp_path / f.name)
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=256)))
    with pytest.raises(DestinationError, match=r"coverage: model\.layers\.0\.mlp\.gate_proj\.weight \[256, 320\] gets 64000"):
        B.from_pretrained(tmp_path, None, hook=True)


def test_parts_split_keeps_shared_checkpoint_tensors_together():
    """Pipeline stages pad their part count by splitting; a tied head and the embeddings (one checkpoint
    tensor) never land in two parts, and a stage that cannot be split that far says so."""
    from streaming_adapters.integrations.nemo.parts import PartPlan, clusters, split_to

    rest = PartPlan(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
                    {"model.embed_tokens.weight": {"model.embed_tokens.weight"}, "model.norm.weight": {"model.norm.weight"},
                     "lm_head.weight": {"model.embed_tokens.weight"}})
    assert clusters(rest) == [["model.embed_tokens.weight", "lm_head.weight"], ["model.norm.weight"]]
    parts = split_to([rest], 2)
    assert [sorted(p.model_keys) for p in parts] == [["lm_head.weight", "model.embed_tokens.weight"],
                                                     ["model.norm.weight"]]
    with pytest.raises(ValueError, match="cannot make 3 load parts"):
        split_to([rest], 3)
