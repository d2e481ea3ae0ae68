"""Block attention kernel == SDPA with the materialized mask, for every pattern, GQA ratio and dtype."""

from __future__ import annotations

import pytest
import torch

from edge_dlm.primitives.attention import Attn
from edge_dlm.kernels.attention import block_attention, block_attention_ref

PATTERNS = [(Attn("causal"), 1), (Attn("causal"), 6), (Attn("block"), 4), (Attn("block"), 17),
            (Attn("quad_first", block=4, prefix=5), 9), (Attn("quad_cycle", block=3), 12),
            (Attn("quad_cycle", block=4), 20)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)


def make(nq, nkv, t, cached, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, t, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(nkv, cached + t, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(nkv, cached + t, d, generator=g).to(DEVICE, dtype)
    return q, k, v


@pytest.mark.parametrize("attn,t", PATTERNS, ids=[f"{a.kind}-T{t}" for a, t in PATTERNS])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_patterns_gqa_dtypes(attn, t, nq, nkv, dtype):
    q, k, v = make(nq, nkv, t, 21, 16, dtype)
    out = block_attention(q, k, v, attn, cached=21)
    ref = block_attention_ref(q, k, v, attn, cached=21)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("attn,t", [(Attn("causal"), 1), (Attn("causal"), 5), (Attn("block"), 4),
                                    (Attn("quad_cycle", block=2), 6)])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_k_matches(attn, t, splits):
    q, k, v = make(4, 2, t, 150, 32, torch.float32, seed=splits)
    out = block_attention(q, k, v, attn, cached=150, splits=splits)
    torch.testing.assert_close(out, block_attention_ref(q, k, v, attn, cached=150), atol=1e-5, rtol=1e-5)


def test_empty_cache_head_dim_not_power_of_two_and_cache_view():
    q, k, v = make(2, 1, 7, 0, 24, torch.float32)  # prefill: no cache; D = 24 pads to 32
    torch.testing.assert_close(block_attention(q, k, v, Attn("causal"), cached=0),
                               block_attention_ref(q, k, v, Attn("causal"), cached=0), atol=1e-5, rtol=1e-5)
    buf = torch.randn(2, 3, 64, 16, device=DEVICE)  # [layers, nkv, capacity, D] as in KVCache
    q = torch.randn(6, 4, 16, device=DEVICE)
    kv = buf[1, :, :30], buf[0, :, :30]  # strided views over the first 30 slots
    torch.testing.assert_close(block_attention(q, *kv, Attn("block"), cached=26),
                               block_attention_ref(q, *kv, Attn("block"), cached=26), atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    q, k, v = make(4, 3, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        block_attention(q, k, v, Attn("block"), cached=8)
    q, k, v = make(4, 2, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="expected cached"):
        block_attention(q, k, v, Attn("block"), cached=7)
    with pytest.raises(ValueError, match="expects 12 tokens"):
        block_attention(q, k, v, Attn("quad_cycle", block=3), cached=8)
