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
from edge_dlm.decoding.base import Decoder, Draft, Event, fetch


def cycle(dec: Decoder, seed: int, start: int) -> tuple[list[int], int, list[int]]:
    """Draft, verify and accept; returns (drafted d1 .. d(B-1), accepted m, AR picks a0 .. a(B-1)).

    The draft's picks (greedy: made inside the pass; sampled: drawn on the device) go to the verify pass
    as a device tensor, and both passes' picks come to the host together: one synchronization a cycle.
    A seeded sampler draws the draft's rows, then the verify pass's, as host picks would."""
    draft = dec.run([seed] + [dec.mask_id] * (dec.block - 1), start, BLOCK, use_lora=dec.opts.use_lora)
    dec.cache.commit(0)  # no-write
    if dec.rules is not None:  # penalties / a grammar: drafts and verify rows picked for their contexts
        drafted = draft.chain(slice(1, None), [])[0] if dec.block > 1 else []
        ar = dec.run([seed] + drafted, start, CAUSAL).verify(slice(None), [], drafted)[0]
        return drafted, accept(dec, drafted, ar), ar
    seed_t = torch.tensor([seed], device=dec.device)
    ahead = draft.device_ids(slice(1, None)) if dec.block > 1 else seed_t[:0]
    verify = dec.run(torch.cat([seed_t, ahead]), start, CAUSAL)
    verify.device_ids(slice(None))  # sampled: its rows drawn now, so `fetch` brings them with the draft's
    fetch(draft, verify)  # the cycle's one synchronization
    drafted = draft(slice(1, None))[0] if dec.block > 1 else []
    ar = verify(slice(None))[0]
    return drafted, accept(dec, drafted, ar), ar


def accept(dec: Decoder, drafted: list[int], ar: list[int]) -> int:
    """The accepted prefix m (a[i] == d[i+1] for i < m); keeps the cache up to seed + d1..dm."""
    m = 0
    while m < len(drafted) and ar[m] == drafted[m]:
        m += 1
    dec.cache.commit(m + 1)  # seed + d1..dm: the cache AR would hold
    return m


def generate(dec: Decoder, prompt_ids: list[int]) -> Iterator[Event]:
    seed = dec.prefill(prompt_ids)
    yield dec.emit([seed])
    while not dec.done:
        drafted, m, ar = cycle(dec, seed, dec.cache.length)
        event = dec.emit(ar[:m + 1])
        dec.cycle(len(event.ids) + (dec.finish_reason == "stop"))
        yield Draft(drafted, m, dec.nfe)
        yield event
        seed = ar[m]
