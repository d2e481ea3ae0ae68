"""The greedy pick of a verify or denoising pass on the GPU, in one launch.

`greedy_pick(logits [R, V], mask_id)`: per row, the argmax over the vocabulary with the mask id
excluded (the first maximal index on ties, as `torch.argmax`) and its softmax probability, the
confidence. One program per row streams the vocabulary in `BLOCK_V` chunks with an online
max / argmax / sum of exp, so the `[R, V]` probabilities are never written. With `--kernels` the
model's passes pick with it (`edge_dlm.model.nld.greedy`); `greedy_pick_ref` is its torch reference.

The acceptance of a speculative cycle and a denoising step's selection are a few integer compares
over B picks: every mode brings its passes' picks to the host once per cycle or step and decides
there (`edge_dlm.decoding`), one path for the torch and the kernel passes alike.
"""

from __future__ import annotations

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
