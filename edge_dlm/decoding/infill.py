"""Fill in the middle and edit in place: denoise masked spans with the text around them in view.

The exact contract is `docs/infill.md`; in short, for a token sequence holding spans of masks
(infill: one span between a prefix and a suffix; edit: the re-masked spans of a text):

1. The tokens before the first remaining mask are cached with one causal pass (none when empty).
2. Window: the `B` tokens starting at that mask (fewer at the end of the sequence). Every token of
   the window sees the cache and the whole window (block attention), so a mask sees everything
   before it and up to `B - 1` tokens after it; tokens past the window are not seen.
3. Denoise the window exactly as diffusion mode denoises a block (`diffusion.denoise_step`: step
   budget `S`, `ceil(r / (S - s))` most confident masks plus every one with confidence >= tau), each
   step one no-write pass (1 NFE). Only masks are ever written. A mask whose span already holds an
   EOS before it is inactive: the span ends at its first EOS (EOS and everything after it in the
   span are dropped); denoising stops when no active mask is left in the window.
4. Drop what the EOS rule cut, then go to 1 for the next window (the causal pass there caches the
   filled window and any gap before the next mask).

NFE = causal passes run + denoising steps run. A zero-length fill runs no pass at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from edge_dlm.primitives.attention import CAUSAL
from edge_dlm.primitives.errors import UserError
from edge_dlm.decoding.base import Canvas, Decoder, Event
from edge_dlm.decoding.diffusion import denoise_step


@dataclasses.dataclass
class Span:
    """Positions [start, end) of the sequence that are masks to fill."""

    start: int
    end: int


def active(seq: list[int], span: Span, j: int, mask_id: int, eos_id: int) -> bool:
    """Whether position j (a mask inside `span`) still needs a token: no EOS before it in its span."""
    return seq[j] == mask_id and eos_id not in seq[span.start:j]


def fill(dec: Decoder, seq: list[int], spans: list[Span], record: dict[int, float] | None = None) -> Iterator[Event]:
    """Denoise every span of `seq` (masks at the span positions) in place; `seq` and `spans` are updated
    (a span shrinks to its text before an EOS). Yields a `Canvas` per denoising step. `record` gets the
    confidence of each committed pick, by position in `seq` as it was when picked."""
    b, steps, tau = dec.block, dec.opts.steps, dec.opts.threshold
    mask, eos = dec.mask_id, dec.eos_id

    def live(lo: int, hi: int) -> list[int]:
        return [j for s in spans for j in range(max(s.start, lo), min(s.end, hi)) if active(seq, s, j, mask, eos)]

    while todo := live(0, len(seq)):
        start = min(todo)
        cached = dec.cache.length
        if start > cached:  # the prefix, or the window just filled plus the gap to the next mask
            dec.forward(seq[cached:start], cached, CAUSAL, last_only=True)  # for its K/V only
            dec.cache.commit(start - cached)
        end = min(start + b, len(seq))
        for step in range(steps):
            now = live(start, end)
            if not now:
                break
            canvas = seq[start:end]
            got: dict[int, float] = {}
            filled = denoise_step(dec, canvas, start, step, steps, tau, [j - start for j in now], got)
            seq[start:end] = canvas
            if record is not None:
                record.update({start + j: c for j, c in got.items()})
            yield Canvas(list(canvas), filled, step, dec.nfe)
        _cut_after_eos(seq, spans, eos)


def _cut_after_eos(seq: list[int], spans: list[Span], eos: int) -> None:
    """A span ends at its first EOS: drop the EOS and the rest of the span, shifting what follows."""
    shift = 0
    for s in spans:
        s.start -= shift
        s.end -= shift
        body = seq[s.start:s.end]
        if eos in body:
            cut = body.index(eos)
            del seq[s.start + cut:s.end]
            shift += s.end - (s.start + cut)
            s.end = s.start + cut


def choose_length(confidences: list[float], threshold: float) -> int:
    """Index of the shortest candidate whose confidence clears `threshold`, else of the most confident."""
    for i, c in enumerate(confidences):
        if c >= threshold:
            return i
    return max(range(len(confidences)), key=lambda i: (confidences[i], -i))


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values)) if values else 0.0


def token_spans(text: str, spans, offsets, block: int) -> list[tuple[int, int, int, int]]:
    """Character spans -> sorted token ranges `(a, b, c0, c1)`: tokens [a, b) re-masked for the
    characters [c0, c1). Spans that touch a common token merge into one (with what lies between)."""
    if not isinstance(spans, (list, tuple)) or not spans:
        raise UserError("edit needs at least one span (START:END, character offsets)")
    out = []
    for sp in spans:
        if not (isinstance(sp, (list, tuple)) and len(sp) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in sp)):
            raise UserError(f"a span is two character offsets START:END, got {sp!r}")
        c0, c1 = sp
        if not 0 <= c0 < c1 <= len(text):
            raise UserError(f"span {c0}:{c1} is not inside the text (0..{len(text)}) or is empty")
        toks = [i for i, o in enumerate(offsets) if o is not None and o[1] > c0 and o[0] < c1]
        if not toks:
            raise UserError(f"span {c0}:{c1} covers no token")
        out.append([toks[0], toks[-1] + 1, c0, c1])
    out.sort()
    merged = [out[0]]
    for a, b, c0, c1 in out[1:]:
        m = merged[-1]
        if a < m[1]:
            m[1], m[3] = max(m[1], b), max(m[3], c1)
        else:
            merged.append([a, b, c0, c1])
    for a, b, c0, c1 in merged:
        if b - a > block:
            raise UserError(f"span {c0}:{c1} is {b - a} tokens; at most {block} (the block size) can be "
                            "re-masked in one place: split it")
    return [(a, b, c0, c1) for a, b, c0, c1 in merged]


def edited_text(text: str, offsets, tok_spans, fills: list[str]) -> str:
    """`text` with each span's characters replaced by its fill (`fills`, decoded), everything outside the
    spans kept byte for byte. The re-masked tokens may reach past a span (a leading space, the rest of a
    word): those characters are kept as they were, and dropped from the fill where it repeats them."""
    out, last = [], 0
    for (a, b, c0, c1), new in zip(tok_spans, fills):
        t0, t1 = offsets[a][0], offsets[b - 1][1]
        before, after = text[t0:c0], text[c1:t1]
        new = new[len(before):] if before and new.startswith(before) else new
        new = new[:len(new) - len(after)] if after and new.endswith(after) else new
        out += [text[last:c0], new]
        last = c1
    return "".join(out) + text[last:]
