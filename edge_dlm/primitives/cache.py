"""A preallocated, static-shape KV cache with first-class rollback (gpt-fast's design).

Layout: one `[layers, kv_heads, capacity, head_dim]` tensor each for K and V (batch 1: edge-dlm serves
one request at a time per cache). `length` tokens are committed; the same count lives on the device
as `length_t` (a 0-d tensor), so a model pass reads it without a host round trip and keeps every shape
static: a pass writes its T new K/V with an index op at the device slots `[length, length + T)` and
attends over a fixed *window* of the cache, `window(T)` (a bucket: 256, 512, 1k, 2k, ... tokens, so a
short chat never pays for the full capacity), masked by the device length. The capacity itself is
rounded up to a power of two, so passes see a handful of shapes and a compiled step function (or a
CUDA graph) is built once per pass shape and bucket, not once per token.

Nothing a pass writes is kept until the decoder says so:

- `commit(n)`: keep the first n new tokens (AR steps, commit passes, LinearSpec's accepted prefix);
- `commit_indices(idx)`: keep selected new tokens, compacted in order (QuadraticSpec keeps `d[0..acc-1]`,
  which sit every `B + 1` slots in its pass);
- nothing: a no-write pass (diffusion denoising, LinearSpec drafts) leaves the cache as it was;
- `truncate(n)`: roll back to a committed prefix of n tokens.
"""

from __future__ import annotations

import torch

MIN_BUCKET = 256


def capacity_bucket(n: int) -> int:
    """The allocated capacity for `n` slots: a power of two, at least `MIN_BUCKET`."""
    c = MIN_BUCKET
    while c < n:
        c *= 2
    return c


def window_bucket(n: int, capacity: int) -> int:
    """The attention window covering `n` slots: 256, 512, 1k, 2k, ... (powers of two: a pass attends
    over at most twice the keys it needs; one step function per bucket), at most the capacity (itself
    a bucket). Powers of four halved the graphs and cost ~5% of demo-model decode speed (AR 2415 vs
    2477 tok/s compiled, 959 vs 1007 eager, `scripts/bench_compiled.py`)."""
    w = MIN_BUCKET
    while w < n:
        w *= 2
    return min(w, capacity)


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (layers, kv_heads, capacity_bucket(capacity), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.length_t = torch.zeros((), dtype=torch.long, device=device)  # `length`, on the device
        self.pending = 0  # new tokens written by the last pass, not yet committed

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _set_length(self, n: int) -> None:
        if n != self.length:  # (the device copy always follows `length`)
            self.length = n
            self.length_t.fill_(n)  # no host synchronization (a device-side fill)

    def begin(self, t: int) -> int:
        """Start a pass of `t` new tokens: check it fits, mark them pending; returns the window."""
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} cached + {t} new > capacity {self.capacity}")
        self.pending = t
        return window_bucket(end, self.capacity)

    def write_all(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a whole pass's new K/V `[layers, kv_heads, T, head_dim]` at once (exported engines)."""
        t = k.shape[2]
        self.begin(t)
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v

    def commit(self, n: int) -> None:
        """Keep the first n tokens of the last pass."""
        if not 0 <= n <= self.pending:
            raise RuntimeError(f"cannot commit {n} of {self.pending} pending tokens")
        if n:
            self._set_length(self.length + n)
        self.pending = 0

    def commit_indices(self, idx: list[int]) -> None:
        """Keep the last pass's new tokens at offsets `idx` (ascending), compacted after the cache."""
        if any(not 0 <= i < self.pending for i in idx) or list(idx) != sorted(set(idx)):
            raise RuntimeError(f"bad commit indices {idx} for {self.pending} pending tokens")
        src = torch.tensor(idx, device=self.k.device) + self.length
        n = len(idx)
        for buf in (self.k, self.v):
            buf[:, :, self.length:self.length + n] = buf.index_select(2, src)
        self._set_length(self.length + n)
        self.pending = 0

    def truncate(self, n: int) -> None:
        """Roll back to the first n committed tokens."""
        if not 0 <= n <= self.length:
            raise RuntimeError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self._set_length(n)
        self.pending = 0

    def committed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the committed K/V, `[layers, kv_heads, length, head_dim]` each."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
