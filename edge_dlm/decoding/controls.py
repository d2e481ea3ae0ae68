"""Generation controls every mode applies where tokens are picked: penalties, logit bias, a grammar
(JSON schema, regex, Lark), end-of-sequence rules and logprobs.

A row of a pass predicts the token after some context: the prompt, the stream emitted so far, and
the tokens the row sees *ahead* of the stream (LinearSpec's verify row i sees the drafts d1..di,
QuadraticSpec's head g sees d[0..g], a diffusion position the block's tokens before it). `Rules`
turns that row's logits into the pick AR would make with the same context:

    penalties   over the last `repeat_last_n` tokens of the context (llama.cpp's and Ollama's
                definitions: repeat divides a positive logit and multiplies a negative one,
                frequency subtracts count x f, presence subtracts p once), then `logit_bias`;
    EOS         banned while fewer than `min_tokens` are emitted, or always with `ignore_eos`;
    grammar     llguidance's token mask for the grammar state after the context (tokens outside it
                get no probability); the matcher follows the emitted stream, and a row that sees
                tokens ahead of it reads a copy advanced past them, so a rejected draft leaves no trace.

So with a grammar or penalties, the verify passes of LinearSpec and QuadraticSpec pick exactly what
constrained / penalised AR picks (drafts are constrained too, so acceptance stays high), and the
logprobs of an emitted token are those of the row that emitted it, AR's. Why llguidance (not
xgrammar): a small Rust wheel with no torch or transformers pin, a tokenizer built straight from
`tokenizer.json`, matchers copied in ~2 us (a row's state ahead of the stream), and JSON schema, regex and
Lark grammars with one matcher.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from edge_dlm.primitives.errors import UserError, install_hint

MAX_STOPS, MAX_STOP_LEN = 16, 256
MAX_GRAMMAR = 64 << 10  # characters of a schema or grammar
MAX_DEPTH = 32  # nesting of a JSON schema
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound
# What a banned token's logit becomes: finite (the pick's all-finite check stays a check of the model),
# and still 0 after softmax at any temperature
BANNED = -1e30


@dataclasses.dataclass(frozen=True)
class Penalties:
    repeat: float = 1.0  # 1: off
    last_n: int = 64  # the window, in tokens of the context (-1: all of it, 0: off)
    frequency: float = 0.0
    presence: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def active(self) -> bool:
        return bool(self.bias) or (self.last_n != 0 and (self.repeat != 1.0 or self.frequency or self.presence))

    def validate(self, vocab: int | None = None) -> None:
        for name, v, lo, hi in (("repeat-penalty", self.repeat, 0.0, 10.0), ("frequency-penalty", self.frequency, -2.0, 2.0),
                                ("presence-penalty", self.presence, -2.0, 2.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (name[0] == "r" and v <= 0):
                raise UserError(f"--{name} must be a number in {'(0' if name[0] == 'r' else f'[{lo:g}'}, {hi:g}], got {v!r}")
        if isinstance(self.last_n, bool) or not isinstance(self.last_n, int) or self.last_n < -1:
            raise UserError(f"--repeat-last-n must be an integer >= -1, got {self.last_n!r}")
        for tok, b in self.bias:
            if vocab is not None and not 0 <= tok < vocab:
                raise UserError(f"logit_bias names token {tok}, outside the vocabulary (0..{vocab - 1})")
            if not -100 <= b <= 100:
                raise UserError(f"logit_bias values must be in -100..100, got {b}")


# JSON as OpenAI's strict mode writes it, one space after ',' and ':' and no other whitespace: a run of
# newlines is valid JSON that a small model can repeat until max_tokens (a schema's "x-guidance" overrides)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the output must match: `kind` "json" (any JSON object), "json_schema", "regex" or "lark"."""

    kind: str
    source: str = ""

    KINDS = ("json", "json_schema", "regex", "lark")

    def grammar(self) -> str:
        """llguidance's grammar for this constraint; a bad one is a one-line `UserError`."""
        ll = _llguidance()
        if self.kind not in self.KINDS:
            raise UserError(f"constraint kind {self.kind[:20]!r} not supported; known: {', '.join(self.KINDS)}")
        if len(self.source) > MAX_GRAMMAR:
            raise UserError(f"the {self.kind.replace('_', ' ')} is {len(self.source)} characters; the limit is {MAX_GRAMMAR}")
        try:
            if self.kind == "json":
                return ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
            if self.kind == "json_schema":
                schema = json.loads(self.source)
                if not isinstance(schema, (dict, bool)):
                    raise UserError("a JSON schema must be an object")
                if _depth(schema) > MAX_DEPTH:
                    raise UserError(f"the JSON schema is nested deeper than {MAX_DEPTH} levels")
                return ll.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
            if self.kind == "regex":
                return ll.LLMatcher.grammar_from_regex(self.source)
            return ll.LLMatcher.grammar_from_lark(self.source)
        except UserError:
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            raise UserError(f"the {self.kind.replace('_', ' ')} is not valid: {str(exc).splitlines()[0][:200]}") from None


def _depth(v: Any, d: int = 0) -> int:
    if d > MAX_DEPTH:
        return d
    if isinstance(v, dict):
        return max((_depth(x, d + 1) for x in v.values()), default=d)
    if isinstance(v, list):
        return max((_depth(x, d + 1) for x in v), default=d)
    return d


GRAMMARS_KEPT = 64  # compiled grammars kept per tokenizer (a server's clients send the same few schemas)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError(f"structured output needs llguidance ({install_hint('structured')})") from None
    return llguidance


def matcher(constraint: Constraint, tokenizer, vocab: int, eos_id: int):
    """A fresh llguidance matcher of `constraint` over `tokenizer` (ours: its `tokenizer.json`)."""
    ll = _llguidance()
    grammar = constraint.grammar()
    key = (vocab, eos_id)  # llguidance's tokenizer, built once per tokenizer (~10 ms to 1 s), kept on it
    built = getattr(tokenizer, "_llguidance", None)
    if built is None or built[0] != key:
        built = tokenizer._llguidance = (key, ll.LLTokenizer(tokenizer.json(), n_vocab=vocab, eos_token=eos_id), {})
    fresh = built[2].get(grammar)  # a grammar's matcher at its start, copied per request (~2 us; building
    if fresh is not None:          # one compiles the grammar: ~1 ms for a small JSON schema)
        return fresh.deep_copy()
    m = ll.LLMatcher(built[1], grammar, log_level=0)
    if m.is_error():
        raise UserError(f"the {constraint.kind.replace('_', ' ')} is not valid: {' '.join(m.get_error().split())[:200]}")
    mask = _allowed(m, vocab)
    only_eos = 0 <= eos_id < vocab and bool(mask[eos_id]) and int(mask.sum()) == 1
    if not bool(mask.any()) or (only_eos and not m.is_accepting()):  # nothing, not even the empty text
        raise UserError(f"the {constraint.kind.replace('_', ' ')} accepts no output")
    if len(built[2]) >= GRAMMARS_KEPT:
        built[2].pop(next(iter(built[2])))  # the oldest
    built[2][grammar] = m.deep_copy()
    return m


def _check_finite(picks) -> None:
    """A pass with a non-finite logit is an error (`nonfinite`), checked once a pass, not once a row."""
    if getattr(picks, "_finite", None) is None:  # one read of the logits (`all_finite`): at 131072 tokens a
        from edge_dlm.primitives.sampling import all_finite  # 32-row pass's isfinite().all() took ~8.5 ms

        picks._finite = bool(all_finite(picks.logits))
    if not picks._finite:
        from edge_dlm.primitives.sampling import nonfinite

        raise nonfinite(picks.logits.dtype)


def _allowed(m, vocab: int, eos_id: int = -1) -> torch.Tensor:
    """The matcher's next-token mask as a bool tensor `[vocab]`."""
    return _unpack([_allowed_bytes(m, vocab, eos_id)], vocab)[0]


def _allowed_bytes(m, vocab: int, eos_id: int) -> bytes:
    """The matcher's next-token mask as llguidance gives it (one bit per token, in 32-bit little-endian
    words); a stopped matcher (the grammar complete, nothing may follow) allows EOS alone."""
    raw = m.compute_bitmask()
    if not m.is_stopped():
        return raw
    bits = bytearray(len(raw))
    if 0 <= eos_id < min(vocab, 8 * len(raw)):
        bits[eos_id // 8] |= 1 << (eos_id % 8)
    return bytes(bits)


def _unpack(masks: list[bytes], vocab: int) -> torch.Tensor:
    """Bit masks -> a bool tensor `[len(masks), vocab]`, in one unpacking."""
    return torch.from_numpy(_unpack_np(masks, vocab))


def _unpack_np(masks: list[bytes], vocab: int):
    """Bit masks -> a bool array `[len(masks), vocab]`."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(b"".join(masks), dtype=np.uint8).reshape(len(masks), -1), axis=1,
                         bitorder="little")[:, :vocab]
    return bits.astype(bool)


class GreedyRows:
    """Rows of one pass picked greedily when nothing but a grammar and the EOS rules shapes the picks
    (`Rules._greedy`): each row's pick is `pick_row`'s (the first maximal logit among the tokens its
    grammar state allows; EOS where none is), found on the host from the rows' logits and probabilities,
    read once a pass: a row whose unmasked pick its mask allows keeps it (its mask's bits are read), any
    other is masked as an array (profiled on the demo model: ~80 us a row all told, where masking and
    picking each row with tensor operations cost ~160-200 us).
    `masked_conf`: the confidence is the masked distribution's (the pick's probability over the allowed
    tokens' total, as `pick_row`'s: diffusion compares it with its threshold), else the unmasked one
    (drafts: no decoder reads it)."""

    def __init__(self, rules: "Rules", picks, rows: list[int], masked_conf: bool) -> None:
        dec = rules.dec
        _check_finite(picks)
        x = picks.logits[rows].float()  # a copy
        x[:, dec.mask_id] = float("-inf")
        self.rules, self.masked_conf = rules, masked_conf
        self.x, self.probs = x.cpu().numpy(), torch.softmax(x, dim=-1).cpu().numpy()
        self.top = self.x.argmax(axis=1)  # the first maximal logit of each row
        dec.syncs += 1

    def pick(self, i: int, index: int, m) -> tuple[int, float]:
        """The `i`th row's pick: the token at `index` of the stream, grammar state `m` before it (None: no
        grammar)."""
        import numpy as np

        rules = self.rules
        eos, vocab = rules.dec.eos_id, self.x.shape[1]
        banned = rules.ignore_eos or index < rules.min_tokens
        tok, p = int(self.top[i]), self.probs[i]
        if m is None and not banned:  # nothing masks this row: the plain pick
            return tok, float(p[tok])
        bits = None if m is None else _allowed_bytes(m, vocab, eos)
        fits = bits is None or (tok // 8 < len(bits) and bits[tok // 8] >> (tok % 8) & 1)
        if fits and not (tok == eos and banned) and not self.masked_conf:
            return tok, float(p[tok])
        allowed = np.ones(vocab, dtype=bool) if bits is None else _unpack_np([bits], vocab)[0]
        if banned:
            allowed[eos] = False
        if not allowed[tok]:
            tok = int(np.where(allowed, self.x[i], -np.inf).argmax())
            if not allowed[tok] or self.x[i, tok] == -np.inf:  # nothing the grammar allows: end here
                return eos, 1.0 if self.masked_conf else float(p[eos])
        return tok, float(p[tok] / p[allowed].sum(dtype=np.float64)) if self.masked_conf else float(p[tok])


class Rules:
    """One request's controls over its picks (see the module docstring). `prompt` is the request's
    prompt ids; `stream` the decoder's emitted ids (read live)."""

    def __init__(self, dec, prompt: list[int], tokenizer=None) -> None:
        o = dec.opts
        self.dec, self.prompt = dec, prompt
        self.pen = o.penalties
        self.min_tokens, self.ignore_eos = o.min_tokens, o.ignore_eos
        self.logprobs = o.logprobs
        self.vocab = dec.model.config.vocab_size
        self.matcher = None if o.constraint is None else matcher(o.constraint, tokenizer, self.vocab, dec.eos_id)
        self.infos: dict[int, dict] = {}  # stream index -> the logprobs of the pick made for it

    @staticmethod
    def needed(opts) -> bool:
        return (opts.penalties.active or opts.constraint is not None or opts.logprobs is not None
                or opts.min_tokens > 0 or opts.ignore_eos)

    # -- the stream
    def accept(self, ids: list[int]) -> None:
        """Emitted tokens (no final EOS): the grammar follows the stream."""
        if self.matcher is not None and ids:
            self.matcher.consume_tokens(ids)

    def take_logprobs(self, start: int, n: int) -> list[dict] | None:
        if self.logprobs is None:
            return None
        return [self.infos.pop(i) for i in range(start, start + n) if i in self.infos]

    # -- picks
    def chain(self, picks, rows: list[int], prefix: list[int]) -> tuple[list[int], list[float]]:
        """Rows picked in order, each seeing `prefix` and the picks of the rows before it (drafts)."""
        return self._run(picks, rows, prefix)

    def verify(self, picks, rows, prefix: list[int], drafted: list[int]) -> tuple[list[int], list[float]]:
        """Row i sees `prefix + drafted[:i]`; rows after the first pick that differs from its draft are
        not used by the decoders (their pick is EOS, never emitted). Every row's context is known
        before any is picked, so the rows are masked, penalised and picked together (one `choose` over
        them, one host transfer): the same picks as one row at a time (`chain`), at a fraction of the
        per-row cost."""
        m = self.matcher.deep_copy() if self.matcher is not None else None
        dec = self.dec
        if not rows or not (m is None or not prefix or m.consume_tokens(prefix)):
            return [dec.eos_id] * len(rows), [0.0] * len(rows)
        # rows past a drafted EOS are never used
        n = next((j + 1 for j, t in enumerate(drafted[:len(rows) - 1]) if t == dec.eos_id), len(rows))
        if self._greedy():  # greedy, a grammar and EOS rules only: row by row on the host (`GreedyRows`)
            ids, conf = self._greedy_chain(picks, rows[:n], prefix, m, drafted)
            return ids + [dec.eos_id] * (len(rows) - n), conf + [0.0] * (len(rows) - n)
        x = picks.logits[rows[:n]].float()  # a copy: the pass's logits stay as they are
        _check_finite(picks)
        base = dec.stream_len + len(prefix)
        masks = []
        for i in range(n):
            ahead = prefix + drafted[:i]
            if self.pen.active:
                self._penalise(x[i], self.prompt + dec.output_ids + [t for t in ahead if t != dec.mask_id])
            if self.ignore_eos or base + i < self.min_tokens:
                x[i, dec.eos_id] = BANNED
            if m is not None:
                masks.append(_allowed_bytes(m, x.shape[1], dec.eos_id))
                if i + 1 < n and not m.consume_token(drafted[i]):  # a draft the grammar refuses: rows
                    n = i + 1  # past it are never used (row i's allowed pick differs from it)
                    break
        x = x[:n]
        if m is not None:
            allowed = _unpack(masks[:n], x.shape[1])
            x.masked_fill_(~allowed.to(x.device), BANNED)
            dead = ~(x > BANNED).any(-1)
            if bool(dead.any()):  # nothing the grammar allows: end here
                x[dead, dec.eos_id] = 0.0
        dec.syncs += 1
        t, c, _ = dec.sampler.pick_tensor(x, picks.draws(rows[:n]))
        ids, conf = t.tolist(), c.tolist()
        used = next((i + 1 for i in range(n) if i >= len(drafted) or ids[i] != drafted[i]), n)
        if self.logprobs is not None:
            for i in range(used):
                self.infos[base + i] = self._info(x[i], ids[i])
        ids[used:], conf[used:] = [dec.eos_id] * (n - used), [0.0] * (n - used)
        return ids + [dec.eos_id] * (len(rows) - n), conf + [0.0] * (len(rows) - n)

    def _run(self, picks, rows, prefix):
        # the rows' grammar state: a copy of the stream's matcher (~2 us) advanced past what each row
        # sees ahead; the stream's own matcher moves only with emitted tokens (`accept`)
        m = self.matcher.deep_copy() if self.matcher is not None else None
        ids, conf = [], []
        ok = m is None or not prefix or m.consume_tokens(prefix)
        if ok and rows and self._greedy():
            return self._greedy_chain(picks, rows, prefix, m)
        for i, r in enumerate(rows):
            if not ok:
                ids.append(self.dec.eos_id)  # a row no decoder uses: past an EOS
                conf.append(0.0)
                continue
            tok, c = self.pick_row(picks, r, prefix + ids, m)
            ids.append(tok)
            conf.append(c)
            if m is not None and i + 1 < len(rows):
                ok = tok != self.dec.eos_id and m.consume_token(tok)
        return ids, conf

    def _greedy(self) -> bool:
        """Whether picks are greedy and nothing but the grammar and EOS rules shapes them (no penalties,
        no logprobs): then `chain` picks rows with `_greedy_chain`."""
        return self.dec.sampler.params.temperature == 0 and not self.pen.active and self.logprobs is None

    def _greedy_chain(self, picks, rows: list[int], prefix: list[int], m,
                      drafted: list[int] | None = None) -> tuple[list[int], list[float]]:
        """`chain` for greedy picks (`GreedyRows`: each row's pick is `pick_row`'s; the confidences are the
        unmasked distribution's: only diffusion reads confidences, and it picks with `greedy_rows`). With
        `drafted` (greedy `verify`): row i sees the drafts before it, up to the first pick that differs from
        its draft — where they agree, the draft is the pick, so the chain is the same walk."""
        dec = self.dec
        rows_ = GreedyRows(self, picks, rows, masked_conf=False)
        ids, conf = [], []
        for i in range(len(rows)):
            tok, c = rows_.pick(i, dec.stream_len + len(prefix) + i, m)
            ids.append(tok)
            conf.append(c)
            if tok == dec.eos_id or i + 1 == len(rows) or (drafted is not None and (i >= len(drafted)
                                                                                   or tok != drafted[i])):
                break
            if m is not None and not m.consume_token(tok):
                break
        return ids + [dec.eos_id] * (len(rows) - len(ids)), conf + [0.0] * (len(rows) - len(ids))

    def greedy_rows(self, picks, rows: list[int]) -> GreedyRows | None:
        """For a greedy request that nothing but its grammar and EOS rules shape (`_greedy`): the rows of
        `picks` ready to be picked with the masked distribution's confidences (diffusion's ordered commits);
        None otherwise (`pick_row` serves)."""
        return GreedyRows(self, picks, rows, masked_conf=True) if self._greedy() else None

    def pick_row(self, picks, row: int, ahead: list[int], m=None) -> tuple[int, float]:
        """The pick of `row` of the pass `picks` for the context prompt + stream + `ahead`; `m` the
        grammar's state after that context (default: the stream's own matcher, nothing ahead)."""
        m = m if m is not None else self.matcher
        dec = self.dec
        x = picks.logits[row].float().clone()  # [V]
        _check_finite(picks)
        if self.pen.active:
            self._penalise(x, self.prompt + dec.output_ids + [t for t in ahead if t != dec.mask_id])
        index = dec.stream_len + len(ahead)
        if self.ignore_eos or index < self.min_tokens:
            x[dec.eos_id] = BANNED
        if m is not None:
            allowed = _allowed(m, x.shape[0], dec.eos_id)
            x.masked_fill_(~allowed.to(x.device), BANNED)
            if not bool((x > BANNED).any()):  # nothing the grammar allows: end here
                x[dec.eos_id] = 0.0
        dec.syncs += 1
        t, c, _ = dec.sampler.pick_tensor(x[None], picks.draws([row]))
        tok = int(t[0])
        if self.logprobs is not None:
            self.infos[index] = self._info(x, tok)
        return tok, float(c[0])

    def _penalise(self, x: torch.Tensor, context: list[int]) -> None:
        p = self.pen
        if p.last_n != 0 and (p.repeat != 1.0 or p.frequency or p.presence):
            window = context if p.last_n < 0 else context[-p.last_n:]
            if window:
                ids = torch.tensor(window, dtype=torch.long, device=x.device)
                uniq, counts = torch.unique(ids, return_counts=True)
                v = x[uniq]
                if p.repeat != 1.0:
                    v = torch.where(v > 0, v / p.repeat, v * p.repeat)
                v = v - counts.to(v.dtype) * p.frequency - (p.presence if p.presence else 0.0)
                x[uniq] = v
        for tok, b in p.bias:
            x[tok] += b

    def _info(self, x: torch.Tensor, tok: int) -> dict:
        """OpenAI's logprob entry for `tok` under the processed logits `x` (mask id excluded)."""
        x = x.clone()
        x[self.dec.mask_id] = BANNED
        lp = torch.log_softmax(x, -1)
        top = []
        if self.logprobs:
            vals, idx = torch.topk(lp, min(self.logprobs, lp.shape[0]))
            top = [(int(i), float(v)) for v, i in zip(vals, idx) if v > -1e20]
        return {"id": tok, "logprob": float(lp[tok]), "top": top}


class StopFilter:
    """Stop sequences over streamed text: `push(delta)` returns the text that can be shown now (never a
    stop sequence, nor the tail that could still become one) and whether a stop sequence ended it."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0  # the longest tail that is a prefix of a stop sequence
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def check_stops(stop) -> tuple[str, ...]:
    """A stop list from a flag or a request: a string or a list of up to `MAX_STOPS` non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UserError("stop must be a string or a list of strings")
    stop = [s for s in stop if s]
    if len(stop) > MAX_STOPS:
        raise UserError(f"at most {MAX_STOPS} stop sequences, got {len(stop)}")
    if any(len(s) > MAX_STOP_LEN for s in stop):
        raise UserError(f"a stop sequence is longer than {MAX_STOP_LEN} characters")
    return tuple(stop)
