"""Diffusion (`diffusion`): denoise `B`-token blocks with a step budget `S` and a threshold `tau`.

Per block: canvas `[seed, M, ..., M]`; at step s, one no-write block pass predicts every masked
position; the `ceil(r / (S - s))` most confident (ties to the lower position) are committed, plus
every one with confidence >= tau. Then the block up to its first EOS is emitted and, if generation
goes on, one causal commit pass caches the block and picks the next seed.
NFE = 1 + per block (denoising passes + 1 if its commit pass ran).

Choice where `decoding.md` leaves room: "a pass that would only produce tokens beyond the budget is
not run" is applied inside a block too, so denoising stops once no mask is left among the positions
that can still be emitted (before the first EOS and within the remaining budget). With an unlimited
budget this is exactly the contract's EOS rule.
"""

from __future__ import annotations

import math
from typing import Iterator

from edge_dlm.primitives.attention import BLOCK, CAUSAL
from edge_dlm.decoding.base import Canvas, Decoder, Event


def needs_pass(canvas: list[int], limit: int, mask_id: int, eos_id: int) -> bool:
    """Whether a mask remains before the first EOS within the first `limit` positions."""
    for tok in canvas[:limit]:
        if tok == mask_id:
            return True
        if tok == eos_id:
            return False
    return False


def denoise_step(dec: Decoder, canvas: list[int], start: int, step: int, steps: int,
                 threshold: float, masked: list[int] | None = None,
                 record: dict[int, float] | None = None) -> list[int]:
    """One no-write block pass; commits picks into `canvas` in place and returns their positions.

    `masked`: the mask positions to fill (default: every mask in the canvas; infill leaves out the
    masks an EOS has cut off). `record` receives the confidence of each committed pick.
    """
    pass_picks = dec.run(canvas, start, BLOCK)
    dec.cache.commit(0)  # no-write: drop this pass's K/V
    if masked is None:
        masked = [j for j, tok in enumerate(canvas) if tok == dec.mask_id]
    k = math.ceil(len(masked) / (steps - step))
    if dec.rules is not None and dec.rules.matcher is not None:
        return _ordered(dec, pass_picks, canvas, masked, k, threshold, record)
    if dec.rules is not None:  # penalties / logprobs / EOS rules: each position for the block's tokens before it
        greedy = dec.rules.greedy_rows(pass_picks, masked)  # greedy, EOS rules only: on the host, once a pass
        picks, conf = [], []
        for n, j in enumerate(masked):
            tok, c = greedy.pick(n, dec.stream_len + j, None) if greedy is not None else \
                dec.rules.pick_row(pass_picks, j, canvas[:j])
            picks.append(tok)
            conf.append(c)
    else:
        picks, conf = pass_picks(masked)
    order = sorted(range(len(masked)), key=lambda i: (-conf[i], masked[i]))
    chosen = set(order[:k]) | {i for i, c in enumerate(conf) if c >= threshold}
    for i in chosen:
        canvas[masked[i]] = picks[i]
        if record is not None:
            record[masked[i]] = conf[i]
    return sorted(masked[i] for i in chosen)


def generate(dec: Decoder, prompt_ids: list[int]) -> Iterator[Event]:
    b, steps, tau = dec.block, dec.opts.steps, dec.opts.threshold
    seed = dec.prefill(prompt_ids)
    while True:
        start = dec.cache.length
        canvas = [seed] + [dec.mask_id] * (b - 1)
        limit = min(b, dec.remaining)
        for step in range(steps):
            if not needs_pass(canvas, limit, dec.mask_id, dec.eos_id):
                break
            filled = denoise_step(dec, canvas, start, step, steps, tau)
            yield Canvas(list(canvas), filled, step, dec.nfe)
        yield dec.emit(canvas)
        if dec.done:
            return
        picks = dec.run(canvas, start, CAUSAL, last_only=True)  # commit pass
        dec.cache.commit(b)
        seed = picks()[0][0]


def _ordered(dec: Decoder, pass_picks, canvas: list[int], masked: list[int], k: int, threshold: float,
             record: dict[int, float] | None) -> list[int]:
    """A denoising step under a grammar: only a grammar-valid token is ever committed, so positions
    are committed left to right, each the masked pick given the block's tokens before it: the `k`
    leftmost masked positions (the contract's count, so the step budget holds), then more while their
    confidence reaches `threshold`. An EOS ends the block's filling."""
    rules, m = dec.rules, dec.rules.matcher.deep_copy()  # the stream's state, advanced along the block
    first = masked[0]
    filled = []
    if first and not m.consume_tokens(canvas[:first]):
        return filled
    greedy = rules.greedy_rows(pass_picks, masked)  # None: each row masked and picked by `pick_row`
    for n, j in enumerate(masked):
        if j != first + n:  # a position after an unfilled one (infill spans): not this step's
            break
        tok, c = greedy.pick(n, dec.stream_len + j, m) if greedy is not None else \
            rules.pick_row(pass_picks, j, canvas[:j], m)
        if n >= k and c < threshold:
            break
        canvas[j] = tok
        filled.append(j)
        if record is not None:
            record[j] = c
        if tok == dec.eos_id or not m.consume_token(tok):
            break
    return filled
