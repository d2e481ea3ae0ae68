"""The small operations between a layer's matmuls as one C call each (`rms_norm`, `silu_mul`, `rope_attend`;
kernels/csrc/pointwise.c and attend.c), which eager CPU passes run instead of torch's operations: the
model's numbers (the rotary embedding, cache writes and attention bit for bit the torch path of the same
pass), rows independent of the pass width, parts of a fused projection read in place, one clear error for
what they cannot take, and a model that runs them giving the logits of one that does not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edge_dlm.kernels import cpu_build, cpu_matmul
from edge_dlm.model.nld import MLP, RMSNorm
from edge_dlm.primitives.attention import Attn

pytestmark = pytest.mark.skipif(bool(cpu_build.available()) or not cpu_build.usable() or
                                not cpu_build.cpp_operators(),
                                reason="; ".join(cpu_build.available()) or "the kernels' C++ operators are not built here")

DTYPES = [torch.float32, torch.bfloat16]


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_is_the_models_and_rows_do_not_depend_on_the_width(dtype):
    norm = RMSNorm(200, 1e-5).to(dtype)  # 200: twelve sums of 16 lanes and a tail
    with torch.no_grad():
        norm.weight.copy_(1 + torch.rand(200, generator=g(0)))
    x = (3 * torch.randn(9, 200, generator=g(1))).to(dtype)
    with torch.inference_mode():
        ref = norm(x)
        got = cpu_build.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    # torch sums the squares in another order: at most one rounding apart (bf16: one unit in the last place)
    torch.testing.assert_close(got, ref, atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    alone = torch.cat([cpu_build.rms_norm(x[i:i + 1], norm.weight, norm.eps) for i in range(9)])
    assert torch.equal(alone, got)
    wide = torch.zeros(9, 3, 200, dtype=dtype)
    wide[:, 1] = x  # rows 600 elements apart, read in place
    assert torch.equal(cpu_build.rms_norm(wide[:, 1], norm.weight, norm.eps), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_is_the_models_on_a_fused_projections_parts(dtype):
    joint = (6 * torch.randn(7, 2 * 72, generator=g(2))).to(dtype)
    joint[0, :8] = torch.tensor([100, -100, 90, -90, 0, -0.0, 1e-30, -1e-30], dtype=dtype)  # both tails of e^x
    gate, up = joint.split(72, -1)  # the views the fused gate / up projection hands out
    got = cpu_build.silu_mul(gate, up)
    ref = F.silu(gate) * up
    # the exponential is within 2 ulp of float32's: the same bf16 values but for a rare rounding tie
    torch.testing.assert_close(got, ref, atol=1e-30, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(torch.cat([cpu_build.silu_mul(gate[i:i + 1], up[i:i + 1]) for i in range(7)]), got)
    assert got.is_contiguous() and got.shape == gate.shape
    nan = cpu_build.silu_mul(torch.full((1, 4), float("nan"), dtype=dtype), torch.ones(1, 4, dtype=dtype))
    assert nan.isnan().all()


def one_pass(model, t: int, length: int, attn: Attn):
    """The logits of one cached pass of `t` tokens after `length` cached ones (random cache contents), and
    the cache after it."""
    cache = model.new_cache(256)
    cache._set_length(length)
    cache.k.normal_(generator=g(3))
    cache.v.normal_(generator=g(4))
    with torch.inference_mode():
        window = cache.begin(t)
        out = model.step(torch.arange(5, 5 + t)[None] % 50 + 5, torch.arange(length, length + t)[None],
                         cache.length_t, cache.k, cache.v, attn, window, False, None)
    return out, cache.k, cache.v


def hooks(model, on: bool):
    """`model` with the small operations' kernels on (as the CPU backend sets them) or off."""
    model = copy.deepcopy(model)
    cpu_matmul.enable_attention(model)
    if on:
        assert cpu_matmul.enable_small_ops(model)
    return model


PASSES = [(1, "causal"), (4, "block"), (9, "causal"), (64, "causal"), (65, "causal")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_attend_is_the_torch_path_bit_for_bit(tiny_model, dtype):
    """A narrow pass's rotary embedding, cache writes and attention in one call: the same logits and the
    same cache contents, bit for bit, as the model's own operations with the C attention; a pass past
    `NARROW` tokens (65) takes SDPA either way."""
    base = hooks(copy.deepcopy(tiny_model).to(dtype), on=True)
    plain = copy.deepcopy(base)
    plain.rope_attention = None
    for t, kind in PASSES:
        a, b = one_pass(base, t, 30, Attn(kind)), one_pass(plain, t, 30, Attn(kind))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (t, kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_model_with_the_small_ops_gives_the_logits_of_one_without(tiny_model, dtype):
    model = copy.deepcopy(tiny_model).to(dtype)
    on, off = hooks(model, on=True), hooks(model, on=False)
    assert on.rope_attention is cpu_build.rope_attend and off.rope_attention is None
    # RMSNorm in bf16 only (`enable_small_ops`: float32's last bit follows the order of a sum, torch's own)
    norm = cpu_build.rms_norm if dtype == torch.bfloat16 else None
    assert all(m.kernel is norm for m in on.modules() if isinstance(m, RMSNorm))
    assert all(m.act is cpu_build.silu_mul for m in on.modules() if isinstance(m, MLP))
    for t, kind in PASSES:
        torch.testing.assert_close(one_pass(on, t, 30, Attn(kind))[0], one_pass(off, t, 30, Attn(kind))[0],
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    on.double()  # a dtype move drops them: torch's operations serve
    assert all(m.kernel is None for m in on.modules() if isinstance(m, RMSNorm))
    assert all(m.act is None for m in on.modules() if isinstance(m, MLP))


def test_a_half_precision_model_keeps_torchs_operations(tiny_model):
    assert not cpu_matmul.enable_small_ops(copy.deepcopy(tiny_model).half())


def test_the_operators_check_what_they_are_given():
    """Wrong shapes, dtypes or cache rows are one clear error, never a crash or a write past the cache."""
    x, w = torch.randn(2, 64), torch.ones(64)
    with pytest.raises(RuntimeError, match="rms_norm takes"):
        cpu_build.rms_norm(x, w.bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm takes"):
        cpu_build.rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm takes"):
        cpu_build.rms_norm(x.half(), w.half(), 1e-5)
    with pytest.raises(RuntimeError, match="silu_mul takes"):
        cpu_build.silu_mul(x, x[:, :32])
    with pytest.raises(RuntimeError, match="silu_mul takes"):
        cpu_build.silu_mul(x, x.bfloat16())
    t, d, nq, nkv = 3, 16, 4, 2
    q, k = torch.randn(1, t, nq * d), torch.randn(1, t, nkv * d)
    cos, sin, qs = torch.ones(1, 1, t, d), torch.zeros(1, 1, t, d), torch.ones(1, 1, t, 1)
    kc = torch.zeros(2, nkv, 8, d)
    mask = torch.ones(t, 8, dtype=torch.bool)

    def call(*, q=q, k=k, cos=cos, kc=kc, vc=None, layer=0, mask=mask, length=torch.tensor(0)):
        vc = torch.zeros_like(kc) if vc is None else vc
        return cpu_build.rope_attend(q, k, k, cos, sin, qs, kc, vc, layer, mask, length, 0.25)

    assert call().shape == q.shape
    for kw, match in [(dict(length=torch.tensor(6)), "past the capacity"), (dict(layer=2), "caches"),
                      (dict(kc=torch.zeros(2, nkv, 8, d).double()), "caches"), (dict(k=k[..., :d]), "q \\[T"),
                      (dict(q=q.bfloat16()), "one dtype"), (dict(cos=cos[..., :8]), "cos / sin"),
                      (dict(mask=torch.ones(t, 9, dtype=torch.bool)), "mask"),
                      (dict(vc=torch.zeros(2, nkv, 4, d)), "caches")]:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)
