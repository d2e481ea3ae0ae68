"""AR (`ar`): one causal pass per token. NFE = 1 + (tokens emitted - 1)."""

from __future__ import annotations

from typing import Iterator

from edge_dlm.primitives.attention import CAUSAL
from edge_dlm.decoding.base import Decoder, Event


def decode_one(dec: Decoder, token: int) -> int:
    """`F([t], L, causal)`, K/V kept, `L += 1`; the next token."""
    picks = dec.run([token], dec.cache.length, CAUSAL)
    dec.cache.commit(1)
    return picks()[0][0]


def generate(dec: Decoder, prompt_ids: list[int]) -> Iterator[Event]:
    token = dec.prefill(prompt_ids)
    while True:
        yield dec.emit([token])
        if dec.done:
            return
        token = decode_one(dec, token)
