"""The Nemotron-Labs-Diffusion model (Ministral-3 architecture) in plain PyTorch.

Pure: no loading, sampling or quantization here. Parameter names are the checkpoint's own
(`encoder.layers.{i}.self_attn.q_proj.weight`, `diffusion_head.weight`, ...), so loading is a lookup.

Per layer (pre-norm, no biases, GQA):
    h = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = rmsnorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m))                   m = rmsnorm(h)
RoPE is rotate-half (NeoX) with YaRN frequencies; after RoPE, q is multiplied by the Llama-4 scale
`1 + beta * log(1 + floor(pos / original_max_position_embeddings))`. Logits come from the untied
`diffusion_head` after the final norm; one head serves every decoding mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_dlm.primitives.attention import Attn
from edge_dlm.primitives.cache import KVCache
from edge_dlm.model.config import NLDConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies `[head_dim / 2]` (fp32), default or YaRN-corrected."""
    pos_freqs = rope.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_extra = 1.0 / pos_freqs
    if rope.rope_type != "yarn":
        return inv_extra
    inv_inter = 1.0 / (rope.factor * pos_freqs)
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_weight = 1 - ramp
    return inv_inter * (1 - extra_weight) + inv_extra * extra_weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.nq, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.nq * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nq * self.hd, h, bias=False)
        # LinearSpec drafter: (A [r, in], B [out, r], scale), applied only when a pass asks for it.
        self.o_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qscale: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None, layer: int,
                use_lora: bool, attn: Attn | None = None, kernel=None) -> torch.Tensor:
        n, t, _ = x.shape
        q = self.q_proj(x).view(n, t, self.nq, self.hd).transpose(1, 2)  # [N, nq, T, hd]
        k = self.k_proj(x).view(n, t, self.nkv, self.hd).transpose(1, 2)  # [N, nkv, T, hd]
        v = self.v_proj(x).view(n, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = q * qscale
        if cache is not None:  # batch 1: attend over committed cache + this pass's tokens
            cached = cache.length
            k_all, v_all = cache.write(layer, k[0], v[0])
            k, v = k_all.unsqueeze(0), v_all.unsqueeze(0)  # [1, nkv, L+T, hd]
        if kernel is not None:  # a fused block-attention kernel: the pattern, never a mask
            o = kernel(q[0], k[0], v[0], attn, cached=cached, scale=self.hd ** -0.5)[None]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               scale=self.hd ** -0.5, enable_gqa=self.nq != self.nkv)
        o = o.transpose(1, 2).reshape(n, t, self.nq * self.hd)
        out = self.o_proj(o)
        if self.o_lora is not None and (torch.is_tensor(use_lora) or use_lora):
            a, b, scale = self.o_lora
            delta = scale * F.linear(F.linear(o, a), b)
            # use_lora: True, or a 0-d 0/1 tensor (exported graphs switch the drafter per pass)
            out = out + (delta * use_lora if torch.is_tensor(use_lora) else delta)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Encoder(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDModel(nn.Module):
    """`encoder.*` + `diffusion_head`, exactly the checkpoint's tensors."""

    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self.rope_scale = cfg.rope.yarn_attention_factor()
        # Optional fused attention for cached passes: fn(q [nq,T,D], k, v [nkv,L+T,D], attn, cached=,
        # scale=) -> [nq,T,D] (edge_dlm.kernels.attention.block_attention); None uses SDPA + a mask.
        self.attn_kernel = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin `[N, 1, T, hd]` and the Llama-4 query scale `[N, 1, T, 1]` for `positions [N, T]`."""
        freqs = positions[..., None].float() * self.inv_freq  # [N, T, hd/2], fp32 as the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(dtype)[:, None]
        rope = self.config.rope
        if rope.llama_4_scaling_beta and rope.original_max_position_embeddings:
            qs = 1 + rope.llama_4_scaling_beta * torch.log(
                1 + torch.floor(positions.float() / rope.original_max_position_embeddings))
        else:
            qs = torch.ones(positions.shape, dtype=torch.float32, device=positions.device)
        return cos, sin, qs[:, None, :, None].to(dtype)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache: KVCache | None = None,
               attn: Attn | None = None, mask: torch.Tensor | None = None,
               use_lora: bool = False) -> torch.Tensor:
        """Final-normed hidden states `[N, T, H]` for `tokens [N, T]` at `positions [N, T]`.

        With a `cache` (batch 1), the pass attends to the committed cache plus its own tokens under
        `attn` (or an explicit `[T, L+T]` `mask`, as exported graphs take it), and leaves its K/V
        pending in the cache for the decoder to commit or drop. Without a cache, `mask` (`[T, T]`
        bool, or None for causal) says which tokens see which (training).
        """
        x = self.encoder.embed_tokens(tokens)
        cos, sin, qscale = self.rope(positions, x.dtype)
        t = tokens.shape[1]
        kernel = None
        if cache is not None:
            assert attn is not None and tokens.shape[0] == 1, "cached passes run one sequence"
            kernel = self.attn_kernel if mask is None else None
            if mask is None and kernel is None:
                mask = attn.full_mask(cache.length, t, tokens.device)
            is_causal = False
        else:
            is_causal = mask is None and t > 1
        for i, layer in enumerate(self.encoder.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, qscale, mask, is_causal,
                                    cache, i, use_lora, attn, kernel)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.encoder.norm(x)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache: KVCache | None = None,
                attn: Attn | None = None, mask: torch.Tensor | None = None,
                use_lora: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits `[N, T, V]` (`[N, 1, V]` with `last_only`: the head runs for the last position alone,
        as a prefill needs; at NLD's 131072-token vocabulary the head is most of a long prefill's work);
        see `hidden` for the other arguments."""
        h = self.hidden(tokens, positions, cache=cache, attn=attn, mask=mask, use_lora=use_lora)
        if last_only:  # [N, H] -> [N, 1, V]; a [N, 1, H] view of h would take torch's slow strided CPU path
            return self.diffusion_head(h[:, -1])[:, None]
        return self.diffusion_head(h)

    def new_cache(self, capacity: int) -> KVCache:
        cfg = self.config
        p = self.encoder.norm.weight  # always floating point, even in a quantized model
        return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity,
                       dtype=p.dtype, device=p.device)
