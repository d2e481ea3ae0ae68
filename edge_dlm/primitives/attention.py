"""The attention patterns of the decoding contract (`decoding.md`), as data.

Every pass attends to the whole committed KV cache; the patterns differ only in which of the *new*
tokens a new token may see. An `Attn` names the pattern so fast kernels can run it without a mask;
`Attn.new_mask(T)` materializes the `[T, T]` boolean new-token mask for the reference path and for
exported graphs (where the mask is a graph input, so one graph serves every mode).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Attn:
    """An attention pattern over the new tokens of one forward pass.

    kind:
      - ``causal``: new token i sees new tokens j <= i (prefill, AR steps, commit and verify passes).
      - ``block``: every new token sees every new token (diffusion denoising, LinearSpec drafts).
      - ``quad_first``: QuadraticSpec's first pass; the first ``prefix`` tokens are causal, the trailing
        ``block`` masks see the prefix and each other.
      - ``quad_cycle``: QuadraticSpec's cycle pass over ``block`` groups ``[d[g], M x block]``; ``d[g]``
        sees ``d[0..g]``, a mask of group g sees ``d[0..g]`` and all tokens of its own group.
    """

    kind: str
    block: int = 0
    prefix: int = 0

    KINDS = ("causal", "block", "quad_first", "quad_cycle")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"attention pattern '{self.kind}' not supported; known: {', '.join(self.KINDS)}")

    def num_tokens(self) -> int | None:
        """The token count this pattern implies, or None when any count works."""
        if self.kind == "quad_first":
            return self.prefix + self.block
        if self.kind == "quad_cycle":
            return self.block * (self.block + 1)
        return None

    def new_mask(self, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[t, t]` bool, True where new token i (row) may attend to new token j (column)."""
        if self.num_tokens() not in (None, t):
            raise ValueError(f"{self.kind} pattern expects {self.num_tokens()} tokens, got {t}")
        if self.kind == "block":
            return torch.ones(t, t, dtype=torch.bool, device=device)
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        if self.kind == "causal":
            return causal
        if self.kind == "quad_first":
            m = causal.clone()
            m[self.prefix:, :] = True  # the masks see the prefix and each other
            return m
        b = self.block
        idx = torch.arange(t, device=device)
        group, slot = idx // (b + 1), idx % (b + 1)  # slot 0 is d[g], slots 1..b its masks
        sees_draft = (slot[None, :] == 0) & (group[None, :] <= group[:, None])  # d[0..g]
        same_group = group[None, :] == group[:, None]
        is_mask = (slot != 0)[:, None]
        return sees_draft | (is_mask & same_group)

    def window_mask(self, length: torch.Tensor, t: int, window: int) -> torch.Tensor:
        """`[t, window]` bool mask over a static cache window whose committed length is the 0-d device
        tensor `length`: key j is visible when committed (j < length) or when it is new token
        j - length and the pattern lets row i see it. Shapes depend on (t, window) only, so one
        compiled pass serves every length."""
        device = length.device
        rel = torch.arange(window, device=device) - length  # key j as a new-token offset
        new = self.new_mask(t, device)[:, rel.clamp(0, t - 1)]  # [t, window]
        return (rel < 0)[None, :] | (((rel >= 0) & (rel < t))[None, :] & new)

    def full_mask(self, cached: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """`[t, cached + t]` bool mask over cache + new tokens, or None when every key is visible."""
        if t == 1 or self.kind == "block":
            return None
        new = self.new_mask(t, device)
        if cached == 0:
            return new
        return torch.cat([torch.ones(t, cached, dtype=torch.bool, device=device), new], dim=1)


CAUSAL = Attn("causal")
BLOCK = Attn("block")
