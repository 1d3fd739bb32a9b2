"""GPU: the fused eager probabilities (numerics/triton_softmax.py, calibrate/attention.py) against ATen's
own CUDA kernels and transformers' own eager attention, bit for bit (run on the GPU machine; not collected
without CUDA).  Row lengths cover every power-of-two bucket of ATen's persistent warp softmax and the
lengths around them; scores span exps that underflow to subnormals and to 0."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from transformers.models.llama.modeling_llama import repeat_kv  # the test family's, as transformers' modules have

from streaming_adapters.calibrate import attention
from streaming_adapters.numerics.triton_softmax import applies, eager_probs_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MIN = torch.finfo(torch.bfloat16).min
LENGTHS = [1, 2, 3, 17, 31, 32, 33, 64, 100, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024, 1025,
           1500, 2047, 2048]


@pytest.fixture(autouse=True)
def fresh_state():
    saved = (set(attention._State.verified), attention._State.disabled, attention._State.calls)
    attention._State.verified, attention._State.disabled, attention._State.calls = set(), None, 0
    yield
    attention._State.verified, attention._State.disabled, attention._State.calls = saved


def stock_probs(scores, mask, scaling):  # transformers' eager_attention_forward, the softmax part
    x = scores * scaling
    if mask is not None:
        x = x + mask
    return F.softmax(x, dim=-1, dtype=torch.float32).to(scores.dtype)


def scores_of(shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    spread = torch.tensor([1.0, 30.0, 300.0, 3000.0], device="cuda")[torch.arange(shape[2], device="cuda") % 4]
    return (torch.randn(shape, generator=g, device="cuda") * spread[:, None]).to(torch.bfloat16)


@pytest.mark.parametrize("k", LENGTHS)
def test_probs_equal_atens_softmax(k):
    q = min(k, 64)
    s = scores_of((2, 8, q, k), k)
    causal = torch.zeros(2, 1, q, k, dtype=torch.bfloat16, device="cuda").masked_fill(
        torch.ones(q, k, dtype=torch.bool, device="cuda").triu(k - q + 1), MIN)
    ragged = torch.where(torch.rand(2, 8, q, k, device="cuda") < 0.5, MIN, 0.0).to(torch.bfloat16)
    ragged[..., 0] = 0.0
    for mask in (None, causal, causal[:1], ragged):
        for scaling in (128 ** -0.5, 192 ** -0.5 * 1.3):
            want = stock_probs(s, mask, scaling)
            got = s.clone()
            assert applies(got, mask)
            eager_probs_(got, mask, scaling)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (k, mask is None, scaling)


def llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    return LlamaAttention(cfg, layer_idx=0).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("k", [40, 1024, 2048])
def test_attention_equals_the_families_eager(k):
    mod = llama_attention()
    g = torch.Generator(device="cuda").manual_seed(k)
    q = torch.randn(1, 8, k, 64, generator=g, device="cuda").to(torch.bfloat16) * 4
    kv = [torch.randn(1, 2, k, 64, generator=g, device="cuda").to(torch.bfloat16) * 4 for _ in range(2)]
    mask = torch.zeros(1, 1, k, k, dtype=torch.bfloat16, device="cuda").masked_fill(
        torch.ones(k, k, dtype=torch.bool, device="cuda").triu(1), MIN)
    stock = sys.modules[type(mod).__module__].eager_attention_forward
    want, want_p = stock(mod, q, *kv, mask, scaling=mod.scaling)
    for _ in range(2):  # the first call checks itself against stock; the second is the fast path alone
        got, got_p = attention.fused_eager_attention(mod, q, *kv, mask, scaling=mod.scaling)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert torch.equal(got_p.view(torch.int16), want_p.view(torch.int16))
    assert attention._State.calls == 2 and attention._State.disabled is None
    assert attention.status().startswith("fused")


def test_a_differing_stock_turns_the_fast_path_off():
    # A family whose eager attention differs (another scaling; note that scaling the queries by 1/8 first or a
    # BF16-output softmax give stock eager's bits exactly, so they cannot serve here): the self-check must
    # notice, return the family's result, and keep to the stock path from then on.
    mod = llama_attention()
    fam = sys.modules[type(mod).__module__]

    class OtherFamily(type(mod)):
        pass

    OtherFamily.__module__ = __name__
    mod.__class__ = OtherFamily
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 300, 64, generator=g, device="cuda").to(torch.bfloat16) * 4
    kv = [torch.randn(1, 2, 300, 64, generator=g, device="cuda").to(torch.bfloat16) * 4 for _ in range(2)]
    got, _ = attention.fused_eager_attention(mod, q, *kv, None, scaling=mod.scaling)
    want, _ = eager_attention_forward(mod, q, *kv, None, scaling=mod.scaling)
    assert torch.equal(got, want)
    assert attention._State.disabled and "differed" in attention.status()
    assert not torch.equal(got, fam.eager_attention_forward(mod, q, *kv, None, scaling=mod.scaling)[0])


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * (scaling * 1.01)  # another scaling: other bits
    w = F.softmax(w, dim=-1)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def test_a_model_built_for_eager_on_cuda_uses_it(checkpoints):
    from streaming_adapters.calibrate.skeleton import Skeleton

    sk = Skeleton(checkpoints("llama", "fp8_block"), torch.device("cuda"), None, "eager")
    assert sk.config._attn_implementation == attention.NAME
    cpu = Skeleton(checkpoints("llama", "fp8_block"), torch.device("cpu"), None, "eager")
    assert cpu.config._attn_implementation == "eager"
