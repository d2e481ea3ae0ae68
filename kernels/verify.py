"""Greedy picks, draft verification and diffusion selection on the device.

Four kernels, each one launch with no host round trip:

- `greedy_pick(logits [R, V], mask_id)`: per row, the argmax over the vocabulary with the mask id
  excluded (the first maximal index on ties, as `torch.argmax`) and its softmax probability, the
  confidence. One program per row streams the vocabulary in `BLOCK_V` chunks with an online
  max / argmax / sum of exp, so the `[R, V]` probabilities are never written.
- `linear_accept(ar [B], drafted [B-1])`: LinearSpec's accepted length m (the longest prefix with
  ar[i] == drafted[i]) and the bonus token ar[m].
- `quad_accept(picks [B, B+1], d [B])`: QuadraticSpec's acceptance over a cycle's greedy picks (row g
  is group g: slot 0 verifies d[g+1], slots 2..B are masks 1..B-1) -> acc and the next draft
  [ar[acc-1], picks[acc-1, 2..B]].
- `diffusion_select(canvas [B], picks [B], conf [B], mask_id, steps_left, threshold)`: one
  denoising step's commit: among masked positions, the ceil(r / steps_left) most confident (ties to
  the lower position) plus all with confidence >= threshold -> (new canvas, chosen mask).

Each has a `*_ref` torch reference below it that mirrors the decoders' Python.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def greedy_pick_kernel(L, TOK, CONF, V, stride, mask_id, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.zeros([], tl.float32)
    arg = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(L + row * stride + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        x = tl.where(idx == mask_id, float("-inf"), x)
        cmax = tl.max(x, 0)
        carg = tl.argmax(x, 0, tie_break_left=True)
        new_m = tl.maximum(m, cmax)
        arg = tl.where(cmax > m, start + carg, arg)  # strict: an earlier chunk wins ties
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
        m = new_m
    tl.store(TOK + row, arg.to(tl.int64))
    tl.store(CONF + row, 1.0 / s)


@triton.jit
def linear_accept_kernel(AR, D, OUT, n_draft, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    a = tl.load(AR + idx, mask=idx <= n_draft, other=-1)
    d = tl.load(D + idx, mask=idx < n_draft, other=-2)
    miss = (idx < n_draft) & (a != d)
    m = tl.min(tl.where(miss, idx, n_draft), 0)
    bonus = tl.sum(tl.where(idx == m, a, 0), 0)
    tl.store(OUT, m.to(tl.int64))
    tl.store(OUT + 1, bonus.to(tl.int64))


@triton.jit
def quad_accept_kernel(P, D, NEXT, ACC, B, BLOCK: tl.constexpr):
    g = tl.arange(0, BLOCK)
    width = B + 1
    prev = tl.load(P + (g - 1) * width, mask=(g >= 1) & (g < B), other=-1)  # ar[g-1]
    d = tl.load(D + g, mask=g < B, other=-2)
    miss = (g >= 1) & (g < B) & (prev != d)
    acc = tl.min(tl.where(miss, g, B), 0)
    row = (acc - 1) * width
    first = tl.load(P + row)  # ar[acc-1]: an AR pick, always correct
    rest = tl.load(P + row + 1 + g, mask=(g >= 1) & (g < B), other=0)  # masks 1..B-1 sit at slots 2..B
    tl.store(NEXT + g, tl.where(g == 0, first, rest).to(tl.int64), mask=g < B)
    tl.store(ACC, acc.to(tl.int64))


@triton.jit
def diffusion_select_kernel(CANVAS, PICKS, CONF, OUT, CHOSEN, B, mask_id, steps_left, threshold,
                            BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    canvas = tl.load(CANVAS + i, mask=i < B, other=-1)
    masked = (canvas == mask_id) & (i < B)
    conf = tl.where(masked, tl.load(CONF + i, mask=i < B, other=0.0).to(tl.float32), float("-inf"))
    r = tl.sum(masked.to(tl.int32), 0)
    k = (r + steps_left - 1) // steps_left
    ci, cj = conf[:, None], conf[None, :]
    ahead = masked[None, :] & ((cj > ci) | ((cj == ci) & (i[None, :] < i[:, None])))
    rank = tl.sum(ahead.to(tl.int32), 1)
    chosen = masked & ((rank < k) | (conf >= threshold))
    picks = tl.load(PICKS + i, mask=i < B, other=0)
    tl.store(OUT + i, tl.where(chosen, picks, canvas).to(tl.int64), mask=i < B)
    tl.store(CHOSEN + i, chosen.to(tl.int8), mask=i < B)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def greedy_pick(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits [R, V]` -> (token ids int64 `[R]`, confidence fp32 `[R]`), mask id excluded."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [R, V] with a contiguous vocabulary, got {list(logits.shape)}")
    r, v = logits.shape
    tok = torch.empty(r, dtype=torch.int64, device=logits.device)
    conf = torch.empty(r, dtype=torch.float32, device=logits.device)
    if r:
        greedy_pick_kernel[(r,)](logits, tok, conf, v, logits.stride(0), mask_id,
                                 BLOCK_V=min(4096, _block(v)))
    return tok, conf


def greedy_pick_ref(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float().clone()
    x[:, mask_id] = float("-inf")
    tok = x.argmax(-1)
    return tok, torch.softmax(x, -1).gather(-1, tok[:, None])[:, 0]


def linear_accept(ar: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
    """`ar [B]`, `drafted [B-1]` (int64, same device) -> `[m, ar[m]]` int64."""
    if ar.numel() != drafted.numel() + 1:
        raise ValueError(f"ar has {ar.numel()} picks for {drafted.numel()} drafted tokens; need one more")
    out = torch.empty(2, dtype=torch.int64, device=ar.device)
    linear_accept_kernel[(1,)](ar, drafted, out, drafted.numel(), BLOCK=_block(ar.numel()))
    return out


def linear_accept_ref(ar: list[int], drafted: list[int]) -> tuple[int, int]:
    m = 0
    while m < len(drafted) and ar[m] == drafted[m]:
        m += 1
    return m, ar[m]


def quad_accept(picks: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`picks [B, B+1]` (a cycle's greedy picks by group), `d [B]` -> (acc `[1]`, next draft `[B]`)."""
    b = d.numel()
    if tuple(picks.shape) != (b, b + 1) or not picks.is_contiguous():
        raise ValueError(f"picks must be a contiguous [{b}, {b + 1}] tensor, got {list(picks.shape)}")
    nxt = torch.empty(b, dtype=torch.int64, device=d.device)
    acc = torch.empty(1, dtype=torch.int64, device=d.device)
    quad_accept_kernel[(1,)](picks, d, nxt, acc, b, BLOCK=_block(b))
    return acc, nxt


def quad_accept_ref(picks: list[list[int]], d: list[int]) -> tuple[int, list[int]]:
    b = len(d)
    ar = [row[0] for row in picks]
    acc = 1
    while acc < b and ar[acc - 1] == d[acc]:
        acc += 1
    return acc, [ar[acc - 1]] + picks[acc - 1][2:b + 1]


def diffusion_select(canvas: torch.Tensor, picks: torch.Tensor, conf: torch.Tensor, mask_id: int,
                     steps_left: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step's commit on the device -> (new canvas int64 `[B]`, chosen bool `[B]`)."""
    b = canvas.numel()
    if picks.numel() != b or conf.numel() != b or steps_left < 1:
        raise ValueError("canvas, picks and conf must have one entry per position; steps_left >= 1")
    out = torch.empty(b, dtype=torch.int64, device=canvas.device)
    chosen = torch.empty(b, dtype=torch.int8, device=canvas.device)
    diffusion_select_kernel[(1,)](canvas, picks, conf, out, chosen, b, mask_id, steps_left, threshold,
                                  BLOCK=_block(b))
    return out, chosen.bool()


def diffusion_select_ref(canvas: list[int], picks: list[int], conf: list[float], mask_id: int,
                         steps_left: int, threshold: float) -> tuple[list[int], list[bool]]:
    """The rule of `decoding/diffusion.py`'s `denoise_step`, over per-position picks."""
    masked = [j for j, tok in enumerate(canvas) if tok == mask_id]
    k = math.ceil(len(masked) / steps_left)
    order = sorted(masked, key=lambda j: (-conf[j], j))
    chosen = set(order[:k]) | {j for j in masked if conf[j] >= threshold}
    return ([picks[j] if j in chosen else tok for j, tok in enumerate(canvas)],
            [j in chosen for j in range(len(canvas))])
