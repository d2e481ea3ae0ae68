"""LinearSpec (`linear-spec`): a diffusion draft verified by a causal pass; lossless.

Per cycle, with the seed at position L (not yet cached):
  draft   `F([seed, M x (B-1)], block, no-write)` (LoRA drafter on when shipped) -> d1 .. d(B-1)
  verify  `F([seed, d1 .. d(B-1)], causal)`, K/V kept -> a0 .. a(B-1), a[i] predicts L+i+1
  accept  the longest prefix with a[i] == d[i+1]; emit a[0..m], keep the cache up to L+m+1.
NFE = 1 + 2 x cycles. Every emitted token is an AR pick given the accepted prefix, so at
temperature 0 the output is AR's, and at T > 0 it is distributed as AR sampling.
With B = 1 the draft pass has no masked position but still runs, as the contract counts it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from edge_dlm.primitives.attention import BLOCK, CAUSAL
from edge_dlm.decoding.base import Decoder, Draft, Event


def draft(dec: Decoder, seed: int, start: int) -> list[int]:
    picks = dec.run([seed] + [dec.mask_id] * (dec.block - 1), start, BLOCK, use_lora=dec.opts.use_lora)
    dec.cache.commit(0)  # no-write
    return picks(slice(1, None))[0] if dec.block > 1 else []


def verify(dec: Decoder, seed: int, drafted: list[int], start: int) -> tuple[int, list[int]]:
    """Causal pass over `[seed] + drafted`; returns (accepted m, AR picks a[0..B-1])."""
    ar = dec.run([seed] + drafted, start, CAUSAL)()[0]
    m = 0
    while m < len(drafted) and ar[m] == drafted[m]:
        m += 1
    dec.cache.commit(m + 1)  # seed + d1..dm: the cache AR would hold
    return m, ar


def cycle_on_device(dec: Decoder, seed: int, start: int) -> tuple[list[int], int, list[int]]:
    """Draft + verify + accept with the picks on the device; one sync: (drafted, m, AR picks)."""
    from edge_dlm.kernels.verify import greedy_pick, linear_accept

    seed_t = torch.tensor([seed], device=dec.device)
    masks = torch.full((dec.block - 1,), dec.mask_id, device=dec.device)
    logits = dec.forward(torch.cat([seed_t, masks]), start, BLOCK, use_lora=dec.opts.use_lora)
    dec.cache.commit(0)  # no-write
    drafted = greedy_pick(logits[1:], dec.mask_id)[0]
    ar = greedy_pick(dec.forward(torch.cat([seed_t, drafted]), start, CAUSAL), dec.mask_id)[0]
    host = torch.cat([linear_accept(ar, drafted), ar, drafted]).tolist()  # the cycle's one sync
    m, b = host[0], dec.block
    dec.cache.commit(m + 1)
    return host[2 + b:], m, host[2:2 + b]


def generate(dec: Decoder, prompt_ids: list[int]) -> Iterator[Event]:
    seed = dec.prefill(prompt_ids)
    yield dec.emit([seed])
    while not dec.done:
        start = dec.cache.length
        if dec.on_device:
            drafted, m, ar = cycle_on_device(dec, seed, start)
        else:
            drafted = draft(dec, seed, start)
            m, ar = verify(dec, seed, drafted, start)
        event = dec.emit(ar[:m + 1])
        dec.cycle(len(event.ids) + (dec.finish_reason == "stop"))
        yield Draft(drafted, m, dec.nfe)
        yield event
        seed = ar[m]
