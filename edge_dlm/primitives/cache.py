"""A preallocated KV cache with first-class rollback.

Layout: one `[layers, kv_heads, capacity, head_dim]` tensor each for K and V (batch 1: edge-dlm serves
one request at a time per cache). `length` tokens are committed. A forward pass writes its new K/V into
the scratch slots `[length, length + T)` of every layer and attends over `[0, length + T)`; nothing is
kept until the decoder says so:

- `commit(n)`: keep the first n new tokens (AR steps, commit passes, LinearSpec's accepted prefix);
- `commit_indices(idx)`: keep selected new tokens, compacted in order (QuadraticSpec keeps `d[0..acc-1]`,
  which sit every `B + 1` slots in its pass);
- nothing: a no-write pass (diffusion denoising, LinearSpec drafts) leaves the cache as it was;
- `truncate(n)`: roll back to a committed prefix of n tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (layers, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.pending = 0  # new tokens written by the last pass, not yet committed

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a pass's new K/V `[kv_heads, T, head_dim]` in scratch; return K/V over cache + new."""
        t = k.shape[1]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} cached + {t} new > capacity {self.capacity}")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        self.pending = t
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def write_all(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a whole pass's new K/V `[layers, kv_heads, T, head_dim]` at once (exported engines)."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} cached + {t} new > capacity {self.capacity}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.pending = t

    def commit(self, n: int) -> None:
        """Keep the first n tokens of the last pass."""
        if not 0 <= n <= self.pending:
            raise RuntimeError(f"cannot commit {n} of {self.pending} pending tokens")
        self.length += n
        self.pending = 0

    def commit_indices(self, idx: list[int]) -> None:
        """Keep the last pass's new tokens at offsets `idx` (ascending), compacted after the cache."""
        if any(not 0 <= i < self.pending for i in idx) or list(idx) != sorted(set(idx)):
            raise RuntimeError(f"bad commit indices {idx} for {self.pending} pending tokens")
        src = torch.tensor(idx, device=self.k.device) + self.length
        n = len(idx)
        for buf in (self.k, self.v):
            buf[:, :, self.length:self.length + n] = buf.index_select(2, src)
        self.length += n
        self.pending = 0

    def truncate(self, n: int) -> None:
        """Roll back to the first n committed tokens."""
        if not 0 <= n <= self.length:
            raise RuntimeError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
        self.pending = 0

    def committed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the committed K/V, `[layers, kv_heads, length, head_dim]` each."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
