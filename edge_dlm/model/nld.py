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
from edge_dlm.primitives.sampling import SamplingParams, all_finite, choose, pack, pack_cat, pack_first, uniforms
from edge_dlm.model.config import NLDConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies `[head_dim / 2]` (fp32), default or YaRN-corrected."""
    # on the CPU even inside a meta-device context (a model built to be loaded): an arange on meta imports
    # torch's compiler stack (1 s of every process's start); the model's `.to(device)` moves it
    pos_freqs = rope.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
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
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extra_weight = 1 - ramp
    return inv_inter * (1 - extra_weight) + inv_extra * extra_weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Fusable(nn.Module):
    """A module some of whose operations may run as one kernel call each, through hooks its model's backend
    sets (`edge_dlm.kernels.cpu_matmul.build`): `fused`, its linears that read one input, returning their
    outputs; `kernel` (RMSNorm) and `act` (MLP), the small operations between the matmuls, for eager passes
    (a compiled pass fuses them itself). A device or dtype move or a load of its weights drops them."""

    fused = None
    HOOKS = ("fused",)

    def _drop(self) -> None:
        for name in self.HOOKS:
            setattr(self, name, None)

    def _apply(self, fn, recurse=True):
        self._drop()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop()
        return super()._load_from_state_dict(*args, **kwargs)


class RMSNorm(Fusable):
    kernel = None  # fn(x, weight, eps): this norm in one call (`edge_dlm.kernels.cpu_build.rms_norm`)
    HOOKS = ("kernel",)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return self.kernel(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SelfAttention(Fusable):
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

    def forward(self, x: torch.Tensor, attend, use_lora: bool) -> torch.Tensor:
        """`attend(q [N, T, nq x hd], k, v [N, T, nkv x hd]) -> o [N, T, nq x hd]` is the pass's attention
        over its cache (or none), the rotary embedding included: the model picks it per pass (see
        `NLDModel.heads`)."""
        q, k, v = self.fused(x) if self.fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        o = attend(q, k, v)
        out = self.o_proj(o)
        if self.o_lora is not None and (torch.is_tensor(use_lora) or use_lora):
            # in float32: the rank-r products are tiny, and inductor's C++ wrapper failed on them in bf16
            a, b, scale = self.o_lora
            delta = (scale * F.linear(F.linear(o.float(), a.float()), b.float())).to(out.dtype)
            # use_lora: True, or a 0-d 0/1 tensor (exported graphs switch the drafter per pass)
            out = out + (delta * use_lora if torch.is_tensor(use_lora) else delta)
        return out


class MLP(Fusable):
    act = None  # fn(gate, up) -> silu(gate) * up in one call (`edge_dlm.kernels.cpu_build.silu_mul`)
    HOOKS = ("fused", "act")

    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused(x) if self.fused is not None else (self.gate_proj(x), self.up_proj(x))
        if self.act is not None and not torch.compiler.is_compiling():
            return self.down_proj(self.act(gate, up))
        return self.down_proj(F.silu(gate) * up)


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
        # a model built to be loaded (on the meta device, `weights.load_model`) skips the random init:
        # normal_ on a meta tensor imports torch's compiler stack (1 s of every process's start)
        meta = torch.empty(0).device.type == "meta"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size) if meta else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDModel(nn.Module):
    """`encoder.*` + `diffusion_head`, exactly the checkpoint's tensors."""

    picks_in_pass = True  # cached passes can return their picks instead of logits (`forward(pick=)`)

    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self.rope_scale = cfg.rope.yarn_attention_factor()
        # The kernel hooks of cached passes, set only by the model's backend (`edge_dlm.kernels.backend`).
        # Fused attention: fn(q [nq,T,D], k, v [nkv,L+T,D], attn, cached=, scale=) -> [nq,T,D]
        # (edge_dlm.kernels.attention.block_attention); None uses SDPA + a mask.
        self.attn_kernel = None
        self.pick_kernel = None  # `greedy`'s fused argmax / confidence with the kernels on
        # Attention of cached passes of up to `NARROW` tokens over a float32 cache (a CPU's):
        # fn(q [nkv, g x T, hd], k, v [nkv, W, hd], mask [T, W], length, scale) -> like q
        # (`edge_dlm.kernels.cpu_matmul.attend`); None: SDPA
        self.narrow_attention = None
        # The same for eager passes with the rotary embedding and the cache writes in the call:
        # fn(q [T, nq x hd], k, v [T, nkv x hd], cos, sin, qscale, k_buf, v_buf, layer, mask, length, scale)
        # -> [T, nq x hd] (`edge_dlm.kernels.cpu_build.rope_attend`)
        self.rope_attention = None
        # The step function cached passes run: `cached_pass` itself (eager) or its compiled form
        # (`edge_dlm.model.compiled.enable`).
        self.step = self.cached_pass
        self.compiled = False

    def __getstate__(self):
        """A copy (deepcopy, pickle) runs its passes eagerly: step functions belong to the model they were
        compiled for (a copied one would run the original's weights)."""
        state = dict(super().__getstate__())
        state.update(step=None, compiled=False)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.step = self.cached_pass

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

    def layers(self, x: torch.Tensor, attend, use_lora: bool) -> torch.Tensor:
        """The decoder stack and the final norm; `attend(layer)` gives that layer's attention."""
        for i, layer in enumerate(self.encoder.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), attend(i), use_lora)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.encoder.norm(x)

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rope: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A layer's projections `[N, T, heads x hd]` as heads `[N, heads, T, hd]`, q and k through the
        rotary embedding `rope` (`NLDModel.rope`'s cos, sin, query scale), q scaled."""
        cos, sin, qscale = rope
        n, t, _ = q.shape
        hd = self.config.head_dim
        q, k, v = (p.view(n, t, -1, hd).transpose(1, 2) for p in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q * qscale, k, v

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        """Heads `[N, heads, T, hd]` back to `[N, T, heads x hd]` (o_proj's input)."""
        n, h, t, d = o.shape
        return o.transpose(1, 2).reshape(n, t, h * d)

    def _sdpa(self, q, k, v, mask, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=self.config.head_dim ** -0.5,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def _sdpa_grouped(self, q, k, v, mask):
        """`_sdpa` with a `[T, W]` mask, the query heads that share a K/V head folded into one head of
        g x T rows (rows ordered head, then token: the mask repeated g times): the keys and values are
        read once per K/V head instead of once per query head (a decode step's attention on a CPU:
        122 vs 166 us at 32 query heads over 8, 256 keys)."""
        n, h, t, d = q.shape
        g = h // k.shape[1]
        if g == 1:
            return self._sdpa(q, k, v, mask)
        o = self._sdpa(q.reshape(n, k.shape[1], g * t, d), k, v, mask.repeat(g, 1))
        return o.reshape(n, h, t, d)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache=None,
               mask: torch.Tensor | None = None, use_lora: bool = False) -> torch.Tensor:
        """Final-normed hidden states `[N, T, H]` for `tokens [N, T]` at `positions [N, T]`, without
        a `KVCache`: training (`mask` `[T, T]` bool, or None for causal) and traced export graphs,
        whose `cache` stands in with `write(layer, k, v) -> (K, V over cache + new)` and an explicit
        `[1, 1, T, L + T]` mask (see `edge_dlm.export.onnx`)."""
        x = self.encoder.embed_tokens(tokens)
        rope = self.rope(positions, x.dtype)
        is_causal = mask is None and tokens.shape[1] > 1

        def attend(i):
            def plain(q, k, v):
                q, k, v = self.heads(q, k, v, rope)
                if cache is not None:
                    k_all, v_all = cache.write(i, k[0], v[0])
                    k, v = k_all[None], v_all[None]
                return self.merge(self._sdpa(q, k, v, mask, is_causal and cache is None))
            return plain
        return self.layers(x, attend, use_lora)

    def cached_pass(self, tokens: torch.Tensor, positions: torch.Tensor, length: torch.Tensor,
                    k_buf: torch.Tensor, v_buf: torch.Tensor, attn: Attn, window: int, use_lora: bool,
                    last: torch.Tensor | None, pick: int | None = None, sample: SamplingParams | None = None,
                    draw: torch.Tensor | None = None):
        """One static-shape pass over a `KVCache`: logits `[T, V]` (`[1, V]` for the row `last`), or
        with `pick` (the mask id) the picks made inside the pass (`picks`: greedy, or with `sample` drawn
        with the random numbers of the key `draw`).

        Everything varying is a device tensor: the committed `length` (0-d), the `positions`, the
        rows to keep; the K/V of the `T` new tokens go to slots `length + arange(T)` with an index
        op and attention runs over the first `window` slots under `attn.window_mask`. So the graph
        depends only on (T, attn, window, use_lora, whether `last`) and the cache's shape: this is
        the step function `edge_dlm.model.compiled` compiles once per pass shape and bucket (and
        captures as a CUDA graph), and eager mode runs it as it is.
        """
        t = tokens.shape[1]
        x = self.encoder.embed_tokens(tokens)
        rope = self.rope(positions, x.dtype)
        slots = length + torch.arange(t, device=tokens.device)
        layer_ids = torch.arange(len(self.encoder.layers), device=tokens.device)
        mask = attn.window_mask(length, t, window)
        kv = k_buf.dtype  # float32 on a CPU for half-precision weights (`new_cache`)
        narrow = self.narrow_attention is not None and t <= NARROW and kv == torch.float32 and not k_buf.is_cuda
        # eager: one call a layer from the projections to o_proj's input (compiled: inductor fuses the same)
        one_call = narrow and self.rope_attention is not None and not torch.compiler.is_compiling() and \
            x.dtype in (torch.bfloat16, torch.float32)

        def attend(i):
            def static(q, k, v):
                if one_call:
                    return self.rope_attention(q[0], k[0], v[0], *rope, k_buf, v_buf, i, mask, length,
                                               self.config.head_dim ** -0.5)[None]
                q, k, v = self.heads(q, k, v, rope)
                # an index_put_ on the whole buffer (not on a per-layer view): inductor updates it in place
                where = [layer_ids[i:i + 1], None, slots]
                torch.ops.aten.index_put_(k_buf, where, k[0].transpose(0, 1).to(kv))  # [T, nkv, hd]
                torch.ops.aten.index_put_(v_buf, where, v[0].transpose(0, 1).to(kv))
                k_win, v_win = k_buf[i, :, :window], v_buf[i, :, :window]
                if narrow:
                    n, h, _, d = q.shape
                    o = self.narrow_attention(q.to(kv).reshape(k_win.shape[0], -1, d), k_win, v_win, mask, length,
                                              self.config.head_dim ** -0.5).reshape(n, h, t, d)
                else:
                    o = self._sdpa_grouped(q.to(kv), k_win[None], v_win[None], mask)
                return self.merge(o.to(q.dtype))
            return static
        h = self.layers(x, attend, use_lora)[0]
        if last is not None:  # [1, H] -> [1, V]: the head for the row a prefill uses, not for all T
            h = h.index_select(0, last)
        logits = self.diffusion_head(h)
        return logits if pick is None else picks(logits, pick, sample, draw, None, (tokens, positions, last))

    def kernel_pass(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attn: Attn,
                    use_lora: bool, last: torch.Tensor | None) -> torch.Tensor:
        """`cached_pass` with the fused Triton block attention (`attn_kernel`): the pattern, never a
        mask, over exactly the committed + new keys (eager; the kernel takes the host length)."""
        t, cached = tokens.shape[1], cache.length
        x = self.encoder.embed_tokens(tokens)
        rope = self.rope(positions, x.dtype)
        end = cached + t

        def attend(i):
            def fused(q, k, v):
                q, k, v = self.heads(q, k, v, rope)
                cache.k[i, :, cached:end] = k[0]
                cache.v[i, :, cached:end] = v[0]
                return self.merge(self.attn_kernel(q[0], cache.k[i, :, :end], cache.v[i, :, :end], attn,
                                                   cached=cached, scale=self.config.head_dim ** -0.5)[None])
            return fused
        h = self.layers(x, attend, use_lora)[0]
        return self.diffusion_head(h if last is None else h.index_select(0, last))  # picked by the caller

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache=None, attn: Attn | None = None,
                mask: torch.Tensor | None = None, use_lora: bool = False, last_only: bool = False,
                pick: int | None = None, sample: SamplingParams | None = None, draw: torch.Tensor | None = None):
        """Logits `[N, T, V]` (`[N, 1, V]` with `last_only`: the head runs for the last position alone,
        as a prefill needs; at NLD's 131072-token vocabulary the head is most of a long prefill's work).

        With a `KVCache` (batch 1), the pass attends to the committed cache plus its own tokens under
        `attn` and leaves its K/V pending in the cache for the decoder to commit or drop; it runs as
        static-shape step functions (`cached_pass`, see `segments`). With `pick` (the mask id) it
        returns the picks made inside the pass instead of logits, packed into one float64 device tensor
        (`picks`: greedy, or with `sample` (its seed unset) drawn as `Sampler` would with the key `draw`,
        `Sampler.key`). Otherwise see `hidden`.
        """
        if not isinstance(cache, KVCache):
            h = self.hidden(tokens, positions, cache=cache, mask=mask, use_lora=use_lora)
            if last_only:  # [N, H] -> [N, 1, V]; a [N, 1, H] view would take torch's slow strided CPU path
                return self.diffusion_head(h[:, -1])[:, None]
            return self.diffusion_head(h)
        assert attn is not None and tokens.shape[0] == 1, "cached passes run one sequence"
        t, start = tokens.shape[1], cache.length
        cache.begin(t)
        out = []
        try:
            for lo, hi, pattern, width in segments(attn, t):
                # [T] -> [1, T] anew: a [1, T] slice keeps its parent's row stride, which a guard would see
                # (a prefill's earlier chunks run the head for one row too, and drop it)
                out.append(self._segment(tokens[0, lo:hi][None], positions[0, lo:hi][None], cache, pattern, width,
                                         use_lora, last_only, pick, sample, draw))
                if hi < t:  # the next segment sees this one's K/V as cached
                    cache._set_length(start + hi)
        finally:
            cache._set_length(start)
            cache.pending = t
        if last_only:
            out = out[-1:]
        if pick is not None:
            return out[0] if len(out) == 1 else pack_cat(out)  # an AR step, a block pass: as it is
        return torch.cat(out)[None] if len(out) > 1 else out[0][None]

    def _segment(self, tokens, positions, cache: KVCache, attn: Attn, width: int, use_lora: bool,
                 last_only: bool, pick: int | None, sample: SamplingParams | None, draw: torch.Tensor | None):
        """One step-function call: `tokens [1, n]` padded to `width` (causal passes only: a pad token
        sits after every real one, so no real token sees it; its K/V land in scratch and are never
        committed) -> logits `[n, V]` (`[1, V]` with `last_only`), or with `pick` its picks."""
        n = tokens.shape[1]
        if width > n:
            pad = width - n
            tokens = torch.cat([tokens, tokens[:, -1:].expand(1, pad)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=positions.device)],
                                  dim=1)
        last = torch.full((1,), n - 1, dtype=torch.long, device=tokens.device) if last_only else None
        window = cache.begin(width)
        if self.attn_kernel is not None:
            out = self.kernel_pass(tokens, positions, cache, attn, use_lora, last)
            out = out if pick is None else picks(out, pick, sample, draw, self.pick_kernel, (tokens, positions, last))
        else:
            out = self.step(tokens, positions, cache.length_t, cache.k, cache.v, attn, window,
                            use_lora, last, pick, sample, draw)
        if last_only:
            return out
        return out[:n] if pick is None else pack_first(out, n)

    def new_cache(self, capacity: int) -> KVCache:
        cfg = self.config
        p = self.encoder.norm.weight  # always floating point, even in a quantized model
        # + CHUNK: a padded causal segment writes scratch up to one chunk past the real tokens
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity + CHUNK,
                        dtype=cache_dtype(p.dtype, p.device), device=p.device)
        if self.compiled and p.device.type == "cuda":  # CUDA graphs update these in place: fixed addresses
            for t in (cache.k, cache.v, cache.length_t):
                torch._dynamo.mark_static_address(t)
        return cache


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype, which is attention's: the model's, except float32 on a CPU, where torch's
    bf16 / fp16 attention is ~10x slower than fp32 (one query over a 1024-token window: 6.1 vs 0.57 ms
    on a Zen 4 core; the cache then takes twice the memory of a bf16 one)."""
    return torch.float32 if device.type == "cpu" else dtype


def draw_rows(tokens: torch.Tensor, positions: torch.Tensor, mask_id: int, last: torch.Tensor | None) -> torch.Tensor:
    """Each row's random-number counter: the position its pick is for, a token's next, a mask's own
    (`Decoder.targets`, on the device)."""
    rows = positions[0] + (tokens[0] != mask_id).long()
    return rows if last is None else rows.index_select(0, last)


def picks(logits: torch.Tensor, mask_id: int, sample: SamplingParams | None, draw: torch.Tensor | None,
          kernel=None, inputs: tuple | None = None) -> torch.Tensor:
    """A pass's picks of `logits [R, V]`, packed (`sampling.pack`): greedy (`greedy`), or with `sample`
    drawn by the sampler's own `choose`, row r with `uniforms(draw, draw_rows(*inputs)[r])` (`inputs`:
    the pass's tokens, positions and kept row): what `Sampler.pick_tensor` draws from these logits,
    with no host synchronization (`sampling.in_pass`)."""
    if sample is None:
        return greedy(logits, mask_id, kernel)
    tokens, positions, last = inputs
    return pack(*choose(logits, mask_id, sample, uniforms(draw, draw_rows(tokens, positions, mask_id, last))))


def greedy(logits: torch.Tensor, mask_id: int, kernel=None) -> torch.Tensor:
    """The decoding contract's greedy pick per row of `logits [R, V]`, inside the pass: the argmax with
    the mask id excluded (ties to the lowest id) and its probability under the untempered softmax (the
    confidence), plus whether every logit is finite (the sampler's check, without a host round trip),
    packed as the pass's one host transfer (`sampling.pack`; `edge_dlm.decoding.base.Picks` reads it).
    `kernel`: the same argmax and confidence in one launch (`edge_dlm.kernels.verify.greedy_pick`).
    `edge_dlm.primitives.sampling.Sampler` is the reference it agrees with."""
    x = logits.float()
    finite = all_finite(x)
    if kernel is not None:
        ids, conf = kernel(x.contiguous(), mask_id)
    else:
        x = x.masked_fill(torch.arange(x.shape[-1], device=x.device) == mask_id, float("-inf"))
        ids = x.argmax(-1)
        conf = torch.softmax(x, -1).gather(-1, ids[:, None])[:, 0]
    return pack(ids, conf, finite)


NARROW = 64  # cached passes of up to this many tokens may attend through `narrow_attention`
CHUNK = 256  # the longest causal segment: a prefill runs in chunks of at most this many tokens
EXACT = 16  # causal segments up to this many tokens run at their own width (AR steps, verify and
WIDTHS = (64, CHUNK)  # commit passes of a block); longer ones are padded to the first of these


def segments(attn: Attn, t: int) -> list[tuple[int, int, Attn, int]]:
    """How a cached pass of `t` tokens under `attn` runs as step functions of a few fixed shapes:
    `(lo, hi, pattern, width)` per call, in order, each seeing the earlier ones as cached.

    Causal passes run in chunks of at most `CHUNK` tokens, each of up to `EXACT` tokens at its own width
    (AR steps, verify and commit passes: B tokens), a longer one padded to a width in `WIDTHS`
    (prefills, infill's context); QuadraticSpec's first pass is its
    causal prompt followed by a block pass over its masks, which see the whole prompt and each other,
    exactly the `quad_first` pattern. Block and cycle passes already have a fixed width (B, B(B+1)).
    """
    if attn.kind == "quad_first":
        p = attn.prefix
        return segments(Attn("causal"), p) + [(p, t, Attn("block"), t - p)]
    if attn.kind != "causal":
        return [(0, t, attn, t)]
    out = []
    for lo in range(0, t, CHUNK):
        n = min(CHUNK, t - lo)
        out.append((lo, lo + n, attn, n if n <= EXACT else next(w for w in WIDTHS if w >= n)))
    return out
