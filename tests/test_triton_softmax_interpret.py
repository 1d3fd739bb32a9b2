"""The eager-probabilities kernel (numerics/triton_softmax.py) under Triton's CPU interpreter, bit for bit
against an independent model of what transformers' eager attention does on CUDA:
``softmax((S * scaling) + mask, -1, dtype=float32).to(bfloat16)`` with ATen's persistent warp softmax
(PersistentSoftmax.cuh: lane ``l`` sums elements ``l + W*it`` in order, lanes meet in an xor butterfly).

The model below is written from that header with plain torch ops (BF16 rounding by torch's own casts), not
from the kernel.  The interpreter has no libdevice, so both sides use numpy's float32 exp here; tests/gpu
checks the kernel's ``__nv_expf`` against ATen's real CUDA softmax and the model's attention end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton) - the kernel needs it")
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

from streaming_adapters.calibrate.attention import implementation  # noqa: E402
from streaming_adapters.numerics.triton_softmax import Tuning, applies, eager_probs_  # noqa: E402

MIN = torch.finfo(torch.bfloat16).min
SCALING = 128 ** -0.5


def cuda_eager_probs(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """What ATen computes on CUDA for rows of <= 2048 elements, in its order."""
    x = scores * scaling  # BF16 tensor * Python float: fp32 product, rounded to BF16
    if mask is not None:
        x = x + mask
    x = x.float()
    k = x.shape[-1]
    p2 = 1 << max(k - 1, 0).bit_length()
    w = min(p2, 32)
    padded = torch.full((*x.shape[:-1], p2), float("-inf"))
    padded[..., :k] = x
    e = torch.from_numpy(np.exp((padded - padded.amax(-1, keepdim=True)).numpy()))
    lanes = e.reshape(*x.shape[:-1], p2 // w, w)
    acc = torch.zeros(*x.shape[:-1], w)
    for it in range(p2 // w):  # each lane in element order
        acc = acc + lanes[..., it, :]
    n = w
    while n > 1:  # xor butterfly: offsets w/2 .. 1
        acc = acc[..., : n // 2] + acc[..., n // 2: n]
        n //= 2
    return (e[..., :k] / acc[..., :1]).to(torch.bfloat16)


def causal(q: int, k: int, batch: int = 1) -> torch.Tensor:
    m = torch.zeros(batch, 1, q, k, dtype=torch.bfloat16)
    return m.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(k - q + 1), MIN)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("shape", [(1, 2, 5, 5), (2, 3, 7, 33), (1, 2, 4, 100), (1, 1, 3, 1), (1, 1, 2, 2048)])
@pytest.mark.parametrize("masking", ["none", "causal", "per-head"])
def test_kernel_equals_the_cuda_order(shape, masking):
    b, h, q, k = shape
    g = torch.Generator().manual_seed(k)
    # a wide range: exps that underflow to 0 and to subnormals, and rows dominated by one element
    scores = (torch.randn(shape, generator=g) * torch.tensor([1.0, 30.0, 300.0])[torch.arange(q) % 3, None]
              ).to(torch.bfloat16)
    mask = {"none": None, "causal": causal(q, k, b),
            "per-head": torch.where(torch.rand(b, h, q, k, generator=g) < 0.3, MIN, 0.0).to(torch.bfloat16)}[masking]
    if mask is not None and masking == "per-head":
        mask[..., 0] = 0.0  # a row keeps one element: ATen's all-masked row is another case (below)
    want = cuda_eager_probs(scores, mask, SCALING)
    got = scores.clone()
    assert applies(got, mask)
    eager_probs_(got, mask, SCALING, interpret=True)
    assert torch.equal(bits(got), bits(want))


TUNINGS = [Tuning(), Tuning(unroll=1), Tuning(unroll=64, staged=True), Tuning(rows=1, warps=1, staged=True),
           Tuning(rows=8, warps=8, unroll=4, staged=True, whole=False), Tuning(rows=16, warps=4, whole=False)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 33), (1, 1, 5, 2048)])
def test_every_tuning_gives_the_same_bytes(tuning, shape):
    b, h, q, k = shape
    g = torch.Generator().manual_seed(q)
    scores = (torch.randn(shape, generator=g) * 40).to(torch.bfloat16)
    mask = causal(q, k, b)
    want = cuda_eager_probs(scores, mask, SCALING)
    got = scores.clone()
    eager_probs_(got, mask, SCALING, interpret=True, tuning=tuning)
    assert torch.equal(bits(got), bits(want))


def test_tuning_is_validated():
    assert Tuning.parse("rows=8, warps=2,unroll=16,staged=1,whole=0") == Tuning(rows=8, warps=2, unroll=16, staged=True,
                                                                             whole=False)
    assert Tuning.parse("") == Tuning()
    with pytest.raises(ValueError, match="SA_EAGER_TUNING.*'row=8'"):
        Tuning.parse("row=8")
    with pytest.raises(ValueError, match="rows must be a power of two"):
        Tuning(rows=3)


def test_masked_to_minus_infinity_rows_are_nan_as_in_aten():
    # a fully masked row of -inf scores: max -inf, exp(NaN): NaN probabilities, as the stock path gives
    scores = torch.full((1, 1, 2, 8), float("-inf"), dtype=torch.bfloat16)
    scores[0, 0, 1] = 1.0
    want = cuda_eager_probs(scores, None, 1.0)
    got = scores.clone()
    eager_probs_(got, None, 1.0, interpret=True)
    assert torch.isnan(got[0, 0, 0]).all() and torch.isnan(want[0, 0, 0]).all()
    assert torch.equal(bits(got[0, 0, 1]), bits(want[0, 0, 1]))


def test_what_the_kernel_takes():
    s = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    assert applies(s, None) and applies(s, causal(3, 4)) and applies(s, torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16))
    assert not applies(s.float(), None)  # FP32 scores: not eager on a BF16 model
    assert not applies(s, causal(3, 4).float())  # an FP32 mask promotes the sum and the softmax input to FP32
    assert not applies(s.transpose(2, 3), None)  # not contiguous
    assert not applies(torch.zeros(1, 1, 1, 2049, dtype=torch.bfloat16), None)  # ATen's block softmax: stock path
    assert not applies(s, torch.zeros(1, 2, 3, 5, dtype=torch.bfloat16))  # does not broadcast


def test_the_fused_attention_is_only_for_eager_on_cuda():
    assert implementation("eager", torch.device("cpu")) == "eager"
    assert implementation("sdpa", torch.device("cpu")) == "sdpa"


def test_the_report_names_the_attention_that_made_the_probabilities():
    from streaming_adapters.calibrate.attention import status

    assert status("sdpa") == "sdpa (not eager: no separate probabilities)"
    assert status("eager") == "stock eager (fused path not used)"  # on CPU the kernel never runs


def test_transformers_takes_the_registered_attention_and_mask():
    # The registration path of implementation() on a CUDA machine, exercised on CPU: transformers builds the
    # model under the registered name and gives the function eager's additive BF16 mask; on CPU the function
    # runs the family's stock eager (the kernel is CUDA only), so the logits equal eager's bit for bit.
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from streaming_adapters.calibrate.attention import NAME, fused_eager_attention

    AttentionInterface.register(NAME, fused_eager_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    ref = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager").eval()
    fused = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation=NAME).eval()
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 100, (1, 23))
    with torch.no_grad():
        a, b = ref(ids).logits, fused(ids).logits
    assert fused.config._attn_implementation == NAME
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("tuning", [Tuning(), Tuning(staged=True, unroll=1, whole=False)], ids=str)
def test_the_kernel_compiles_for_hopper_as_launched(tuning):
    # Compiled here for sm_90 with Triton's bundled ptxas (no GPU needed), with the parameters Triton itself
    # reads from the kernel (its tl.constexpr annotations) and the launch options of eager_probs_: no
    # flush-to-zero in the exp's arithmetic (ATen's expf keeps subnormals), an IEEE division.
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from streaming_adapters.numerics.triton_softmax import _kernel

    k = _kernel(False)
    const = {"W": 32, "IT": 64, "LOG_W": 5, "HAS_MASK": True, "ROWS": tuning.rows, "LIBDEVICE": True,
             "UNROLL": tuning.unroll, "STAGED": tuning.staged, "WHOLE": tuning.whole}
    assert {p.name for p in k.params if p.is_constexpr} == set(const)
    const = dict(const)
    # the runtime arguments at k = 2048 with a causal [1, 1, q, k] mask, specialised as Triton's launcher does
    # (native_specialize_impl: 1 -> a constant, multiples of 16 -> "D", divisible by 16)
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    args = {"n_rows": 4 * 96 * 2048 + 4, "k": 2048, "n_h": 96, "n_q": 2048, "scale": 0.088,
            "m_stride_b": 0, "m_stride_h": 0, "m_stride_q": 2048, "m_stride_k": 1}
    names = [p.name for p in k.params]
    sig, attrs = {"s_ptr": "*bf16", "m_ptr": "*bf16"}, {(names.index("s_ptr"),): [["tt.divisibility", 16]],
                                                       (names.index("m_ptr"),): [["tt.divisibility", 16]]}
    for p in k.params:
        if p.name in args:
            ty, key = native_specialize_impl(BaseBackend, args[p.name], False, not p.do_not_specialize, True)
            if ty == "constexpr":
                const[p.name] = args[p.name]
            elif key == "D":
                attrs[(names.index(p.name),)] = [["tt.divisibility", 16]]
            sig[p.name] = ty
    assert "k" not in const and (names.index("k"),) in attrs and const["m_stride_k"] == 1
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": tuning.warps, "enable_fp_fusion": False, "enable_reflect_ftz": False})
    ptx = out.asm["ptx"]
    assert re.search(r"div\.rn\.f32", ptx) and not re.search(r"div\.(full|approx)", ptx)
    ftz = re.findall(r"^\s*(\S+\.ftz\S*)", ptx, re.M)
    assert ftz and set(ftz) == {"ex2.approx.ftz.f32"}  # only inside __nv_expf, on its reduced argument
    if tuning.whole:  # the row max's load: 16-byte vectors (k and the mask's row stride are multiples of 16)
        assert re.search(r"ld\.global\.v4\.b32", ptx)
