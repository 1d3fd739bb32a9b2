"""load_fp8_checkpoint in one process: every family (real transformers classes built on meta), tied
embeddings, a torchtitan-named model, the docs' add-a-family example, plain expert ranges, groups,
and the mapping errors (all found before any byte is read)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import model_bodies as B
import streaming_adapters as sa
from helpers import assert_bit_equal
from reference import reference_state_dict
from streaming_adapters.errors import DestinationError
from streaming_adapters.models import KeyMapper, Part, get_key_mapper

DOCS = Path(__file__).parent.parent / "docs" / "models.md"

FAMILIES = [
    ("llama", "fp8_block", {}),
    ("mistral", "fp8_tensor", {}),
    ("ministral3", "fp8_tensor", {}),
    ("ministral3_vlm", "fp8_tensor", {"vlm_layout": "new"}),
    ("ministral3_vlm", "fp8_tensor", {"vlm_layout": "old"}),
    ("ministral3_vlm", "fp8_block", {"vlm_layout": "old"}),
    ("qwen3", "ct_channel", {}),
    ("qwen3_moe", "fp8_block", {}),
    ("deepseek_v3", "fp8_block", {}),
    ("mixtral", "fp8_block", {}),
]


def _loaded(path, **options):
    model = B.meta_model(path)
    B.materialize(model, tie=options.pop("tie", False))
    return model, sa.load_fp8_checkpoint(model, path, **options)


@pytest.mark.parametrize("case", FAMILIES, ids=lambda c: "-".join([c[0], c[1], *c[2].values()]))
def test_every_family_bits_and_logits(checkpoints, case):
    family, fmt, kw = case
    path = checkpoints(family, fmt, **kw)
    model, report = _loaded(path)
    assert B.check_loaded(model, path) == sum(v.numel() for v in model.state_dict().values())
    assert_bit_equal(B.logits(model), B.reference_logits(B.bf16_copy(path)), "logits")
    quantized = sum(1 for k in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
                    if k.endswith(("weight_scale_inv", "weight_scale")))
    assert report.quantized == quantized and report.missing == report.unexpected == []


def test_vlm_tower_and_projector_stay_unquantized(checkpoints):
    path = checkpoints("ministral3_vlm", "fp8_tensor", vlm_layout="new")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == [
        "model.vision_tower", "model.multi_modal_projector", "lm_head"]
    raw = reference_state_dict(path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("model.vision_tower.transformer.layers.") for k in raw)
    assert not [k for k in weight_map if k.endswith("_scale_inv") and ("vision" in k or "projector" in k)]
    old = json.loads((checkpoints("ministral3_vlm", "fp8_tensor", vlm_layout="old")
                      / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.lm_head.weight" in old and "vision_tower.patch_conv.weight" in old


@pytest.mark.parametrize("layout", ["new", "old"])
def test_text_model_from_vlm_checkpoint(checkpoints, layout):
    """Ministral3ForCausalLM (the text model alone) from a Mistral3 VLM checkpoint: the tower and the
    projector are the only unexpected tensors (strict=False), and the text logits are the VLM's."""
    from transformers import AutoModelForCausalLM

    path = checkpoints("ministral3_vlm", "fp8_tensor", vlm_layout=layout)
    text_cfg = B.config_of(path).text_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text_cfg, dtype=torch.bfloat16)
    B.materialize(model)
    with pytest.raises(DestinationError, match="unexpected: 24 checkpoint tensor"):
        sa.load_fp8_checkpoint(model, path)
    report = sa.load_fp8_checkpoint(model, path, strict=False)
    assert len(report.unexpected) == 24 and all("vision_tower." in k or "multi_modal_projector." in k
                                                for k in report.unexpected)
    B.check_loaded(model, path)
    assert_bit_equal(B.logits(model), B.reference_logits(B.bf16_copy(path)), "logits")


@pytest.mark.parametrize("retie", [True, False])
def test_tied_embeddings(checkpoints, retie):
    """The checkpoint has no lm_head.weight.  Re-tied after to_empty: one storage, filled once; left
    untied (plain to_empty makes a new Parameter per module): lm_head is read from the embeddings."""
    path = checkpoints("llama", "fp8_block", tie_word_embeddings=True)
    model, report = _loaded(path, tie=retie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == retie
    B.check_loaded(model, path)
    assert_bit_equal(B.logits(model), B.reference_logits(B.bf16_copy(path)), "logits")
    assert report.tensors == 29 + (0 if retie else 1) and report.unexpected == []


def test_one_dcp_load_per_layer(checkpoints, monkeypatch):
    import streaming_adapters.models.load as L

    calls = []
    real = L.dcp_load
    monkeypatch.setattr(L, "dcp_load", lambda sd, reader, planner, pg: (calls.append(planner.requests),
                                                                        real(sd, reader, planner, pg)))
    path = checkpoints("qwen3_moe", "fp8_block")
    model, report = _loaded(path)
    assert report.groups == len(calls) == 3
    layers = [{re.match(r"model\.layers\.(\d+)\.", r.model_key).group(1) if ".layers." in r.model_key else "-"
               for r in reqs} for reqs in calls]
    assert layers == [{"0"}, {"1"}, {"-"}]
    # fused experts: 5 experts x (gate + up) and 5 x down per layer, each its own view of the parameter
    layer0 = [r for r in calls[0] if ".experts." in r.model_key]
    assert len(layer0) == 15
    storage = model.model.layers[0].mlp.experts.gate_up_proj.untyped_storage().data_ptr()
    assert sum(r.view.untyped_storage().data_ptr() == storage for r in layer0) == 10


def test_fused_experts_are_filled_without_stack_or_cat(checkpoints, monkeypatch):
    path = checkpoints("mixtral", "fp8_block")
    model = B.meta_model(path)
    B.materialize(model)

    def refuse(*a, **k):
        raise AssertionError("torch.stack / torch.cat called while loading")

    monkeypatch.setattr(torch, "stack", refuse)
    monkeypatch.setattr(torch, "cat", refuse)
    sa.load_fp8_checkpoint(model, path)
    monkeypatch.undo()
    B.check_loaded(model, path)


def test_plain_expert_range(checkpoints):
    """A rank holding experts 2..4 of 5 as plain tensors (``expert_range=(2, 5)``): the tensors are 5
    experts wide globally, and only the rank's 3 are read."""
    path = checkpoints("qwen3_moe", "fp8_block")
    model = B.meta_model(path)
    for layer in model.model.layers:
        ex = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            shape = getattr(ex, name).shape[1:]
            setattr(ex, name, nn.Parameter(torch.empty(3, *shape, device="meta", dtype=torch.bfloat16)))
    B.materialize(model)
    report = sa.load_fp8_checkpoint(model, path, expert_range=(2, 5))
    assert report.quantized == 2 * (4 + 3 * 3)  # per layer: q/k/v/o + 3 experts x gate/up/down
    assert report.unexpected == [] and B.check_loaded(model, path, expert_range=(2, 5)) > 0
    with pytest.raises(DestinationError, match=r"shard: model\.layers\.0\.mlp\.experts\.gate_up_proj local "
                                               r"\[3, 192, 320\] at offset \[2, 0, 0\] exceeds .* \[4, 192, 320\]"):
        sa.load_fp8_checkpoint(model, path, expert_range=(2, 4), strict=False)  # experts 2..4 of "4"


# -- a torchtitan-named model ------------------------------------------------------------------------
class TTAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        half = self.head_dim // 2
        q, k = (t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin for t in (q, k))
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class TTFeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False),
                                     nn.Linear(dim, hidden, bias=False))

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class TTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = TTAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.feed_forward = TTFeedForward(c.hidden_size, c.intermediate_size)
        self.attention_norm, self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps), RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class TorchtitanLlama(nn.Module):
    """torchtitan's Llama names: tok_embeddings, layers.N.attention.wq/wk/wv/wo, feed_forward.w1/w2/w3,
    attention_norm, ffn_norm, norm, output."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleDict({str(i): TTBlock(c) for i in range(c.num_hidden_layers)})
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, tokens):
        d, base = self.c.head_dim, self.c.rope_parameters["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.outer(torch.arange(tokens.shape[1]).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.tok_embeddings(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def test_torchtitan_names(checkpoints):
    path = checkpoints("llama", "fp8_block")
    cfg = B.config_of(path)
    with torch.device("meta"):
        model = TorchtitanLlama(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    report = sa.load_fp8_checkpoint(model, path, key_mapper=get_key_mapper({"model_type": "torchtitan_llama"}))
    assert report.tensors == 30 and report.unexpected == []
    B.check_loaded(model, path)  # the test's own name table maps torchtitan names to HF's
    with torch.no_grad():
        got = model(B.TOKENS)
    # The hand-written forward does transformers' ops in transformers' order (fp32 RMSNorm, rotate_half,
    # SDPA with expanded KV heads): the logits match to the bit.
    assert_bit_equal(got, B.reference_logits(B.bf16_copy(path)), "logits")


# -- the docs' example ---------------------------------------------------------------------------------
def test_docs_add_a_family_example(checkpoints):
    """Runs the example of docs/models.md as written: a Llama whose attention holds one fused qkv_proj."""
    block = re.search(r"<!-- example: add-a-family -->\s*```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) < 30
    namespace: dict = {}
    exec(compile(block, str(DOCS), "exec"), namespace)
    path = checkpoints("llama", "fp8_block")
    model = B.meta_model(path)
    for layer in model.model.layers:
        a = layer.self_attn
        rows = a.q_proj.out_features + a.k_proj.out_features + a.v_proj.out_features
        a.qkv_proj = nn.Linear(a.q_proj.in_features, rows, bias=False, device="meta", dtype=torch.bfloat16)
        del a.q_proj, a.k_proj, a.v_proj
    B.materialize(model)
    report = sa.load_fp8_checkpoint(model, path, key_mapper=get_key_mapper({"model_type": "llama_fused_qkv"}))
    assert report.unexpected == [] and report.quantized == 21
    ref = reference_state_dict(path)
    for i, layer in enumerate(model.model.layers):
        want = torch.cat([ref[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])
        assert_bit_equal(layer.self_attn.qkv_proj.weight.detach(), want, f"layer {i} qkv")


# -- errors (found before any I/O) ---------------------------------------------------------------------
def test_meta_model_refused(checkpoints):
    model = B.meta_model(checkpoints("llama", "fp8_block"))
    with pytest.raises(DestinationError, match="meta device") as e:
        sa.load_fp8_checkpoint(model, checkpoints("llama", "fp8_block"))
    assert "to_empty" in str(e.value)


def test_missing_model_key(checkpoints):
    path = checkpoints("llama", "fp8_block")
    model = B.meta_model(path)
    model.model.layers[2].mlp.register_buffer("bias_table", torch.empty(3, device="meta"))
    model.model.layers[1].self_attn.register_parameter("sinks", nn.Parameter(torch.empty(5, device="meta")))
    B.materialize(model)
    with pytest.raises(DestinationError, match=r"2 problem\(s\).*examples=") as e:
        sa.load_fp8_checkpoint(model, path)
    assert "model.layers.1.self_attn.sinks" in str(e.value) and "model.layers.2.mlp.bias_table" in str(e.value)
    report = sa.load_fp8_checkpoint(model, path, strict=False)
    assert sorted(report.missing) == ["model.layers.1.self_attn.sinks", "model.layers.2.mlp.bias_table"]
    ref = reference_state_dict(path)
    assert_bit_equal(model.model.layers[2].mlp.up_proj.weight.detach(), ref["model.layers.2.mlp.up_proj.weight"])


def test_unexpected_checkpoint_tensor(checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama", "fp8_block"), dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    f = dst / idx["weight_map"]["model.norm.weight"]
    tensors = load_file(f)
    tensors["model.extra_head.weight"] = torch.zeros(3, 320, dtype=torch.bfloat16)
    save_file(tensors, f, metadata={"format": "pt"})
    idx["weight_map"]["model.extra_head.weight"] = f.name
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    model = B.meta_model(dst)
    B.materialize(model)
    with pytest.raises(DestinationError, match=r"unexpected: 1 checkpoint tensor\(s\).*model\.extra_head\.weight"):
        sa.load_fp8_checkpoint(model, dst)
    report = sa.load_fp8_checkpoint(model, dst, strict=False)
    assert report.unexpected == ["model.extra_head.weight"] and report.missing == []


class _Broken(KeyMapper):
    """Fills layer 0's up_proj wrongly: ``mode`` "overlap" from two parts at the same rows, "shape"
    from a tensor of another shape."""

    def __init__(self, mode):
        self.mode, self.base = mode, get_key_mapper({"model_type": "llama"})

    def parts(self, key, shape, ckpt):
        if key != "model.layers.0.mlp.up_proj.weight":
            return self.base.parts(key, shape, ckpt)
        a = "model.layers.0.mlp.up_proj.weight"
        if self.mode == "overlap":
            return [Part(a), Part(a, (), (0, 0))]
        return [Part("model.layers.0.mlp.down_proj.weight")]


@pytest.mark.parametrize("mode,message", [("overlap", "duplicate: model.layers.0.mlp.up_proj.weight and"),
                                          ("shape", "shape: model.layers.0.mlp.down_proj.weight [320, 200]")])
def test_bad_mapping_is_an_error_even_non_strict(checkpoints, mode, message, monkeypatch):
    path = checkpoints("llama", "fp8_block")
    model = B.meta_model(path)
    B.materialize(model)
    import streaming_adapters.models.load as L

    monkeypatch.setattr(L, "dcp_load", lambda *a: pytest.fail("I/O before the mapping was checked"))
    with pytest.raises(DestinationError, match=re.escape(message)):
        sa.load_fp8_checkpoint(model, path, key_mapper=_Broken(mode), strict=False)


def test_partial_coverage_is_an_error(checkpoints):
    path = checkpoints("qwen3_moe", "fp8_block")
    model = B.meta_model(path)
    B.materialize(model)

    class FourOfFive(KeyMapper):  # forgets expert 4's down_proj
        base = get_key_mapper({"model_type": "qwen3_moe"})

        def parts(self, key, shape, ckpt):
            parts = self.base.parts(key, shape, ckpt)
            return [p for p in parts if not p.ckpt_key.endswith("experts.4.down_proj.weight")]

    with pytest.raises(DestinationError, match=r"coverage: model\.layers\.\d\.mlp\.experts\.down_proj \[5, 320, 96\] "
                                               r"gets 122880 of 153600"):
        sa.load_fp8_checkpoint(model, path, key_mapper=FourOfFive(), strict=False)
