"""QuadraticSpec (`quadratic-spec`): verify every prefix and draft the next block in one pass.

First pass (1 NFE): `prompt ++ [M x B]`, the prompt causal, the masks seeing the prompt and each
other; only the prompt's K/V are kept. d[0] is the AR pick at the prompt's last position, d[j] the
pick at mask j.
Each cycle (1 NFE) runs B groups `[d[g], M x B]` (B(B+1) tokens; d[g] at L+g, its masks at
L+g+1 .. L+g+B) under the `quad_cycle` mask. `ar[g]` (the logit at d[g]) verifies d[g+1]; the
accepted prefix d[0..acc-1] is emitted and its K/V kept; the next draft comes from group acc-1:
d[0] = pick(ar[acc-1]) (an AR pick, so always correct) and d[j] = pick(mask j of that group).
NFE = 1 + cycles; at temperature 0 the output is AR's.

Choice where `decoding.md` leaves room: d[0] is already an AR pick when a cycle would start, so when
it is EOS, or when only one token of budget remains, it is emitted without running the cycle (a pass
that would only produce tokens beyond the budget is not run).
"""

from __future__ import annotations

from typing import Iterator

from edge_dlm.primitives.attention import Attn
from edge_dlm.decoding.base import Decoder, Draft, Event


def first_pass(dec: Decoder, prompt_ids: list[int]) -> list[int]:
    b, p, start = dec.block, len(prompt_ids), dec.cache.length
    passed = dec.run(prompt_ids + [dec.mask_id] * b, start, Attn("quad_first", block=b, prefix=p))
    dec.cache.commit(p)  # keep the prompt's K/V only
    if dec.rules is not None:  # d[0] for its context, then the drafts in order after it
        d0 = passed.chain([p - 1], [])[0]
        return d0 + (passed.chain(slice(p + 1, p + b), d0)[0] if b > 1 else [])
    picks = passed(slice(p - 1, p + b))[0]  # rows: AR at P-1, then masks 0..B-1
    return [picks[0]] + picks[2:]  # mask 0 (same position as d[0]) is unused


def cycle(dec: Decoder, d: list[int]) -> tuple[int, list[int]]:
    """One QuadraticSpec pass; returns (acc, next draft)."""
    b, start, m = dec.block, dec.cache.length, dec.mask_id
    tokens, positions = [], []
    for g in range(b):
        tokens += [d[g]] + [m] * b
        positions += [start + g] + list(range(start + g + 1, start + g + b + 1))
    picks = dec.run(tokens, positions, Attn("quad_cycle", block=b))  # B(B+1) rows
    heads = [g * (b + 1) for g in range(b)]
    ar = picks.verify(heads, d[:1], d[1:])[0]  # ar[g] predicts L+g+1 (seeing d[0..g])
    acc = 1
    while acc < b and ar[acc - 1] == d[acc]:
        acc += 1
    dec.cache.commit_indices(heads[:acc])
    group = heads[acc - 1]
    rest = picks.chain(slice(group + 2, group + b + 1), d[:acc] + [ar[acc - 1]])[0] if b > 1 else []  # masks
    # 1..B-1 of group acc-1
    return acc, [ar[acc - 1]] + rest


def generate(dec: Decoder, prompt_ids: list[int]) -> Iterator[Event]:
    d = first_pass(dec, prompt_ids)
    while True:
        if d[0] == dec.eos_id or dec.remaining <= 1:
            yield dec.emit(d[:1])
            return
        acc, nxt = cycle(dec, d)
        event = dec.emit(d[:acc])
        dec.cycle(len(event.ids) + (dec.finish_reason == "stop"))
        yield Draft(d, acc, dec.nfe)
        yield event
        if dec.done:
            return
        d = nxt
