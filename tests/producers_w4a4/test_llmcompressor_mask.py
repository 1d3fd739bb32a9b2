"""Why llm-compressor 0.14.0.1 (transformers 5.17) calibrates Mistral and Qwen3-MoE (and Ministral3, Mixtral)
without a causal mask, and Mistral and Qwen3-MoE bit for bit anyway.

The mechanism (docs/calibration.md), in llm-compressor's sequential pipeline
(``pipelines/sequential/helpers.py::trace_subgraphs``):

1. ``MistralModel.forward`` / ``Qwen3MoeModel.forward`` make the mask through a local:
   ``mask_function = create_causal_mask if self.config.sliding_window is None else
   create_sliding_window_causal_mask; causal_mask = mask_function(config=self.config, ...)``.  The AST
   autowrapper (``ast_utils/auto_wrapper.py::AutoWrapper.visit_Call``) wraps a call only when it can evaluate the
   callee's name in the module's globals; ``mask_function`` is a local, so this call is not wrapped (Llama and
   Qwen3 call ``create_causal_mask(...)`` by name, in the ignore list: wrapped, ``self.config`` read live).
2. The tracer's ``autowrap_functions`` (``_get_autowrap_functions``: the values of transformers'
   ``LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING``) still make it one leaf call, but its ``config=self.config``
   argument goes through ``SequentialTracer.create_arg``, which records a ``PretrainedConfig`` as a node calling
   the config class on ``config.to_dict()``.  ``to_dict`` drops ``_attn_implementation_internal``
   (``PretrainedConfig._remove_keys_not_serialized``), so the rebuilt config has ``_attn_implementation=None``.
3. In ``masking_utils._preprocess_mask_arguments``, an attention implementation not in
   ``ALL_MASK_ATTENTION_FUNCTIONS`` means "a custom kernel that needs no mask": early exit, and
   ``create_causal_mask`` / ``create_sliding_window_causal_mask`` return the 2D mask after preprocessing: None.
4. The layers run eager attention (``calibration_forward_context`` sets ``model.config._attn_implementation =
   "eager"``), whose ``eager_attention_forward`` adds the mask only if it is not None: every query attends to
   every key, a forward the model never computes.  The sliding window plays no part (Qwen3-MoE's is None);
   loading the model with ``attn_implementation="eager"`` does not help (the rebuilt config drops it too).

The tests: the traced graph and the mask it hands layer 0, family by family; layer 0's attention output equal
to a mask-less eager forward; llm-compressor with step 2 fixed (``keep_attn_implementation``) equal to our
default output byte for byte, also with a sliding window shorter than the samples; llm-compressor as shipped
equal byte for byte to our engine handed the same None mask, and to our default output in every tensor that
does not depend on the mask.
"""

from __future__ import annotations


import pytest
import torch

from helpers import assert_bit_equal
from w4a4_runs import assert_ct_configs_equivalent, compare, llmcompressor_w4a4, load_bf16, ours, read_all

# families whose traced graph hands the layers no mask (transformers 5.17 modeling files with the
# ``mask_function = ...`` local: also Phi-3, PhiMoE, Starcoder2, not fixtures here); DeepSeek-V3 calls
# create_causal_mask by name
NO_MASK = ("mistral", "qwen3_moe", "ministral3", "mixtral")


def _ours_ct(setup_row, name: str, **kw):
    src, _bf16, _ids, data, d = setup_row
    out = d / name
    return out if (out / "config.json").exists() else ours(src, data, "compressed-tensors", out, **kw)


def _layer0_inputs(model, run) -> dict[str, object]:
    """Layer 0's attention_mask, q_proj input and o_proj input (the attention output) during ``run()``."""
    layer = model.model.layers[0]
    q = layer.self_attn.q_proj or layer.self_attn.q_a_proj  # DeepSeek-V3 (q_lora_rank): q_a_proj, q_proj None
    got: dict[str, object] = {}

    def pre_layer(_m, _args, kwargs):
        got.setdefault("mask", kwargs.get("attention_mask"))

    hooks = [layer.register_forward_pre_hook(pre_layer, with_kwargs=True),
             q.register_forward_pre_hook(lambda _m, a: got.setdefault("q_in", a[0].clone())),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: got.setdefault("o_in", a[0].clone()))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepseek_v3", *NO_MASK])
def test_llmcompressor_layer0_mask(setup, family):
    from llmcompressor.args.dataset_arguments import DatasetArguments
    from llmcompressor.pipelines.sequential.helpers import trace_subgraphs
    from llmcompressor.utils.helpers import calibration_forward_context
    from llmcompressor.utils.pytorch.module import infer_sequential_targets
    from transformers.configuration_utils import PretrainedConfig

    _src, bf16, ids, _data, _d = setup(family)
    model = load_bf16(bf16)
    x = torch.tensor([ids[0]])
    sample = {"input_ids": x, "attention_mask": torch.ones_like(x)}  # what oneshot's dataloader yields
    dargs = DatasetArguments()
    subgraphs = trace_subgraphs(model, sample, infer_sequential_targets(model, dargs.sequential_targets),
                                dargs.tracing_ignore)

    # step 2: a node rebuilding the config, feeding the mask function, without the attention implementation
    rebuilt = [n for n in subgraphs[0].graph.nodes
               if n.op == "call_function" and isinstance(n.target, type) and issubclass(n.target, PretrainedConfig)]
    if family in NO_MASK:
        assert len(rebuilt) == 1 and "attn_implementation" not in rebuilt[0].kwargs
        assert [u.target.__name__ for u in rebuilt[0].users] == [
            "create_causal_mask" if model.config.sliding_window is None else "create_sliding_window_causal_mask"]
    else:
        assert rebuilt == []  # the mask comes from an AST-wrapped call reading the live self.config
    assert type(model.config)(**model.config.to_dict())._attn_implementation is None

    def llmc():  # the pipeline's first two subgraphs: everything before layer 0, then layer 0
        values = dict(sample)
        for sg in subgraphs[:2]:
            values.update(sg.forward(model, **{k: values[k] for k in sg.input_names}))

    def own(mask_none: bool):  # the model's own forward (eager: calibration_forward_context)
        def run():
            h = model.model.layers[0].register_forward_pre_hook(
                lambda _m, a, kw: (a, {**kw, "attention_mask": None}), with_kwargs=True) if mask_none else None
            try:
                model.model(**sample)
            finally:
                if h is not None:
                    h.remove()
        return run

    with calibration_forward_context(model):
        theirs = _layer0_inputs(model, llmc)
        causal = _layer0_inputs(model, own(False))
        maskless = _layer0_inputs(model, own(True))
    assert isinstance(causal["mask"], torch.Tensor) and causal["mask"].shape == (1, 1, x.shape[1], x.shape[1])
    assert_bit_equal(theirs["q_in"], causal["q_in"], "layer 0 q_proj input (before the attention)")
    assert not torch.equal(causal["o_in"], maskless["o_in"])  # the mask matters on these samples
    amax = {k: float(v["o_in"].abs().max()) for k, v in (("llmc", theirs), ("causal", causal),
                                                        ("maskless", maskless))}
    print(f"{family}: layer 0 o_proj input amax {amax}")
    if family in NO_MASK:  # steps 3 and 4: no mask, and exactly the mask-less attention
        assert theirs["mask"] is None
        assert_bit_equal(theirs["o_in"], maskless["o_in"], "layer 0 o_proj input vs mask-less eager")
    else:
        assert_bit_equal(theirs["mask"], causal["mask"], "layer 0 mask")
        assert_bit_equal(theirs["o_in"], causal["o_in"], "layer 0 o_proj input vs causal eager")


# sliding_window=16: shorter than every sample (24..48 tokens), so the window itself is in the mask; fixed
# llm-compressor and our engine both take it from transformers' create_sliding_window_causal_mask.
@pytest.mark.parametrize("family,config", [("mistral", {}), ("mistral", {"sliding_window": 16}),
                                           ("qwen3_moe", {})], ids=["mistral", "mistral-window16", "qwen3_moe"])
def test_llmcompressor_fixed_bit_for_bit(setup, family, config):
    row = setup(family, **config)
    _src, bf16, ids, _data, d = row
    theirs = llmcompressor_w4a4(bf16, ids, d / "llmc-fixed", moe=family == "qwen3_moe",
                                keep_attn_implementation=True)
    mine = _ours_ct(row, "ours-ct-causal")
    assert compare(theirs, mine) > 0
    qa, qb = assert_ct_configs_equivalent(theirs, mine)
    assert qa["config_groups"]["group_0"] == qb["config_groups"]["group_0"]
    if config:  # the window is really in both masks: same weights and tokens, other scales than full causal
        full, win = read_all(_ours_ct(setup(family), "ours-ct-causal")), read_all(mine)
        assert all(torch.equal(full[k], win[k]) for k in full if k.endswith("weight_packed"))
        assert any(not torch.equal(full[k], win[k]) for k in full if k.endswith("input_global_scale"))


@pytest.mark.parametrize("family", ["mistral", "qwen3_moe"])
def test_llmcompressor_as_shipped_is_maskless(setup, family):
    row = setup(family)
    _src, bf16, ids, _data, d = row
    theirs = llmcompressor_w4a4(bf16, ids, d / "llmc-as-shipped", moe=family == "qwen3_moe")
    # our engine handed the mask llm-compressor hands the layers: every tensor byte-identical
    assert compare(theirs, _ours_ct(row, "ours-ct-maskless", layer_mask_none=True)) > 0
    # our default (causal) output: only input scales downstream of layer 0's attention differ
    a, b = read_all(theirs), read_all(_ours_ct(row, "ours-ct-causal"))
    differ = {k for k in a if not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))}
    upstream = {f"model.layers.0.self_attn.{p}_proj.input_global_scale" for p in "qkv"}
    assert all(k.endswith("input_global_scale") for k in differ), sorted(differ)[:5]
    assert not differ & upstream and "model.layers.0.self_attn.o_proj.input_global_scale" in differ
    print(f"{family}: {len(differ)} of {sum(k.endswith('input_global_scale') for k in a)} input scales differ")
