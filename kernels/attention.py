"""Block attention over a KV cache for every decoding pattern, with no mask in memory.

Queries are the T new tokens of one pass (`[nq, T, D]`); keys and values are the cache plus those
tokens (`[nkv, L + T, D]`, any strides, e.g. a view of `KVCache.k[layer]`). Key j is visible to new
token i when j < L (every pattern sees the whole cache) or, for the new-token index jj = j - L:

    causal      jj <= i
    block       always
    quad_first  i >= P or jj <= i              (P = the causal prefix; the masks see everything)
    quad_cycle  (jj is a draft slot and its group <= i's group) or (i is a mask and same group)
                groups are B + 1 tokens long, slot 0 is the draft token d[g]

Algorithm: FlashAttention-2's forward. One program per (query tile, query head, key split) streams
`BLOCK_N` keys at a time with an online softmax (running max m, sum l, fp32 accumulator); GQA maps
query head h to KV head h // (nq / nkv). Split-K: with few queries over a long cache (an AR step,
a 32-token verify at 16k context) one head's tiles cannot fill the GPU, so the keys are cut into
`splits` ranges, each program writes its normalized partial output and log-sum-exp, and a short
combine weights the partials by softmax(lse). Causal tiles stop at their last visible key.

Under `TRITON_INTERPRET=1` (CPU CI) dots run in fp32: the interpreter computes bf16 `tl.dot` wrongly.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from edge_dlm.primitives.attention import Attn

PATTERNS = {"causal": 0, "block": 1, "quad_first": 2, "quad_cycle": 3}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def visible(offs_m, offs_n, cached, PATTERN: tl.constexpr, param):
    """[M, N] bool: new token offs_m may see key offs_n (cache keys first)."""
    ii = offs_m[:, None]
    jj = offs_n[None, :] - cached
    in_cache = jj < 0
    if PATTERN == 0:
        ok = jj <= ii
    elif PATTERN == 1:
        ok = jj >= 0
    elif PATTERN == 2:
        ok = (ii >= param) | (jj <= ii)
    else:
        group = param + 1
        jn = tl.maximum(jj, 0)
        gi, si = ii // group, ii % group
        gj, sj = jn // group, jn % group
        ok = ((sj == 0) & (gj <= gi)) | ((si != 0) & (gi == gj))
    return in_cache | ok

@triton.jit
def attn_fwd(Q, K, V, O, LSE,
             sq_h, sq_t, sk_h, sk_t, sv_h, sv_t, so_s, so_h, so_t, sl_s, sl_h,
             T, cached, n_keys, split_len, sm_scale, param,
             GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, PATTERN: tl.constexpr, DOT_F32: tl.constexpr,
             IEEE: tl.constexpr, WRITE_LSE: tl.constexpr):
    pid_m, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    q = tl.load(Q + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_keys)
    if PATTERN == 0:  # causal: nothing past this tile's last query
        hi = tl.minimum(hi, cached + (pid_m + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < hi
        k = tl.load(K + kvh * sk_h + offs_n[None, :] * sk_t + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
        v = tl.load(V + kvh * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        ok = visible(offs_m, offs_n, cached, PATTERN, param) & n_ok[None, :]
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        elif DOT_F32:
            pv = tl.dot(p, v)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    empty = l_i == 0.0  # a split with no visible key for this row
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + split * so_s + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + split * sl_s + h * sl_h + offs_m, lse, mask=offs_m < T)



def pattern_code(attn: Attn) -> tuple[int, int]:
    """(PATTERN constexpr, its runtime parameter) for an `Attn`."""
    param = attn.prefix if attn.kind == "quad_first" else attn.block
    return PATTERNS[attn.kind], param


def default_splits(t: int, n_keys: int, nq: int, device: torch.device) -> int:
    """Key splits so that small-T passes over long caches still give every SM work."""
    if device.type != "cuda" or n_keys < 1024:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = math.ceil(t / 16) * nq
    return max(1, min(n_keys // 512, math.ceil(2 * sms / tiles)))


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Attn, *, cached: int,
                    scale: float | None = None, splits: int | None = None) -> torch.Tensor:
    """Attention of new-token queries `q [nq, T, D]` over keys/values `k, v [nkv, cached + T, D]`.

    `attn` is the pass's pattern over the new tokens (the cache is always visible). Returns
    `[nq, T, D]` in q's dtype. `splits` > 1 forces the split-K path (default: chosen by shape).
    """
    nq, t, d = q.shape
    nkv, n_keys, dk = k.shape
    if k.shape != v.shape or dk != d:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must match, head_dim {d}")
    if nq % nkv:
        raise ValueError(f"{nq} query heads are not a multiple of {nkv} KV heads")
    if n_keys != cached + t:
        raise ValueError(f"keys hold {n_keys} positions, expected cached {cached} + T {t}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of float16, bfloat16, float32")
    if attn.num_tokens() not in (None, t):
        raise ValueError(f"{attn.kind} expects {attn.num_tokens()} tokens, got {t}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    pattern, param = pattern_code(attn)
    scale = d ** -0.5 if scale is None else scale
    splits = splits or default_splits(t, n_keys, nq, q.device)
    block_m, block_n = 16, 32 if interpreting() else 64
    split_len = math.ceil(n_keys / splits / block_n) * block_n
    splits = math.ceil(n_keys / split_len)
    o = torch.empty((splits, nq, t, d), dtype=q.dtype if splits == 1 else torch.float32, device=q.device)
    lse = torch.empty((splits, nq, t), dtype=torch.float32, device=q.device) if splits > 1 else o
    grid = (math.ceil(t / block_m), nq, splits)
    dot_f32 = interpreting() or q.dtype == torch.float32
    attn_fwd[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0) if splits > 1 else 0, lse.stride(1) if splits > 1 else 0,
        t, cached, n_keys, split_len, scale, param,
        GROUP=nq // nkv, D=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), BLOCK_M=block_m, BLOCK_N=block_n,
        PATTERN=pattern, DOT_F32=dot_f32, IEEE=q.dtype == torch.float32 and not interpreting(),
        WRITE_LSE=splits > 1, num_warps=4)
    if splits == 1:
        return o[0]
    w = torch.softmax(lse * math.log(2.0), dim=0)  # lse is base 2; [splits, nq, T]
    return (o * w[..., None]).sum(0).to(q.dtype)


def block_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Attn, *, cached: int,
                        scale: float | None = None) -> torch.Tensor:
    """The torch reference: SDPA with the pattern materialized as a mask (as the model's default path)."""
    nq, t, d = q.shape
    mask = attn.full_mask(cached, t, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None].float(), k[None].float(), v[None].float(), attn_mask=mask,
        scale=d ** -0.5 if scale is None else scale, enable_gqa=nq != k.shape[0])
    return out[0].to(q.dtype)
