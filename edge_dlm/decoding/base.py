"""What every decoding mode shares: request options, events, the result, and the `Decoder` context.

A mode is a generator `generate(dec, prompt_ids)` yielding events; `Decoder` owns the model, the cache,
the sampler and the counters, and applies the budget / stop rule of `decoding.md` in one place
(`emit`). Layering (after mlx-lm): step (`Decoder.forward`/`pick`) -> mode stream -> text (runtime).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Union

import torch

from edge_dlm.decoding.controls import Constraint, Penalties, Rules, check_stops, MAX_LOGPROBS
from edge_dlm.primitives.attention import CAUSAL, Attn
from edge_dlm.primitives.cache import KVCache
from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.sampling import Sampler, SamplingParams, in_pass, nonfinite, pack, packed_ids, unpack

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
SPECULATIVE = ("linear-spec", "quadratic-spec")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """One request's decoding options. `block_size`/`steps` of None take the checkpoint's block size."""

    mode: str = "linear-spec"
    max_new_tokens: int = 256
    block_size: int | None = None
    steps: int | None = None
    threshold: float = 0.9
    sampling: SamplingParams = SamplingParams()
    use_lora: bool = True
    stop: tuple[str, ...] = ()  # stop sequences: the text ends before the first one (`controls.StopFilter`)
    min_tokens: int = 0  # EOS is not picked before this many tokens
    ignore_eos: bool = False  # never EOS (benchmarks: exactly max_new_tokens)
    penalties: Penalties = Penalties()
    logprobs: int | None = None  # None: off; N: each emitted token's logprob and the top N
    constraint: Constraint | None = None  # JSON / JSON schema / regex / Lark the output must match

    def resolve(self, default_block: int, context: int | None = None) -> "GenerationOptions":
        """Fill defaults from the checkpoint and validate; raises `UserError` with the flag to fix."""
        if self.mode not in MODES:
            raise UserError(f"mode '{str(self.mode)[:40]}' not supported; known: {', '.join(MODES)}")
        for name in ("block_size", "steps", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise UserError(f"--{name.replace('_', '-')} must be an integer, got {str(v)[:40]!r}")
        b = default_block if self.block_size is None else self.block_size
        if b < 1:
            raise UserError(f"--block-size must be >= 1, got {b}")
        if context is not None and b > context:
            raise UserError(f"--block-size {b} is larger than the model's {context}-token context")
        s = b if self.steps is None else self.steps
        if not 1 <= s <= b:
            raise UserError(f"--steps must be in 1..{b} (the block size), got {s}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold <= 1:
            raise UserError(f"--threshold must be in 0..1, got {str(self.threshold)[:40]}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.use_lora, bool):
            raise UserError(f"use_lora must be true or false, got {self.use_lora!r}")
        self.sampling.validate()
        self.penalties.validate()
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise UserError(f"--min-tokens must be an integer >= 0, got {str(self.min_tokens)[:40]}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise UserError(f"--logprobs must be an integer in 0..{MAX_LOGPROBS}, got {str(self.logprobs)[:40]}")
        return dataclasses.replace(self, block_size=b, steps=s, stop=check_stops(self.stop))

    def scratch_tokens(self) -> int:
        """The most tokens one pass of this mode writes beyond the committed cache."""
        b = self.block_size or 1
        return b * (b + 1) if self.mode == "quadratic-spec" else b


# ---- events -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Canvas:
    """A diffusion block after a denoising pass. `tokens` holds the mask id where still masked."""

    tokens: list[int]
    committed: list[int]  # positions filled by this pass
    step: int
    nfe: int


@dataclasses.dataclass(frozen=True)
class Draft:
    """A speculative cycle: the drafted block and how many of its tokens were emitted."""

    tokens: list[int]
    accepted: int
    nfe: int


@dataclasses.dataclass(frozen=True)
class Emit:
    """Tokens appended to the output (never the final EOS, never the mask id)."""

    ids: list[int]
    nfe: int
    logprobs: list[dict] | None = None  # with `logprobs`: per id, {"id", "logprob", "top": [(id, logprob)]}


@dataclasses.dataclass
class Result:
    """The fields of `edge-dlm generate --json` (`decoding.md`, "What every run reports")."""

    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    mode: str
    nfe: int
    tpf: float
    elapsed_s: float
    tokens_per_s: float
    mean_accepted: float | None = None
    ttft_s: float | None = None
    logprobs: list[dict] | None = None  # per output id, with `logprobs` (see `Emit`)
    tool_calls: list[dict] | None = None  # with tools: [{"name", "arguments": JSON text}]; `text` the rest

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("mean_accepted", "logprobs", "tool_calls"):
            if d[key] is None:
                d.pop(key)
        return d


@dataclasses.dataclass(frozen=True)
class Done:
    result: Result


Event = Union[Canvas, Draft, Emit, Done]


# ---- the decoder context ------------------------------------------------------------------------

class Decoder:
    """State of one generation: model passes (counted as NFE), picks, and the emitted stream."""

    def __init__(self, model: torch.nn.Module, opts: GenerationOptions, cache: KVCache,
                 prompt: list[int] | None = None, tokenizer=None) -> None:
        cfg = model.config
        self.model = model
        self.opts = opts
        self.cache = cache
        self.block = opts.block_size
        self.mask_id = cfg.mask_token_id
        self.eos_id = cfg.eos_token_id
        self.device = cache.k.device
        self.sampler = Sampler(opts.sampling, self.mask_id, self.device)
        self.nfe = 0
        self.syncs = 0  # host transfers of picks (greedy or sampled: one per AR step, denoising step or cycle)
        self.stream_len = 0  # emitted tokens, a final EOS included
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cycles = 0
        self.cycle_tokens = 0
        self.first_token_time: float | None = None
        self.logprobs: list[dict] | None = [] if opts.logprobs is not None else None
        # penalties, a grammar, EOS rules or logprobs: picks made from the logits, row by row (`controls`)
        self.rules = Rules(self, list(prompt or []), tokenizer) if Rules.needed(opts) else None

    # -- steps
    def forward(self, tokens: list[int] | torch.Tensor, positions: int | list[int], attn: Attn,
                use_lora: bool = False, last_only: bool = False) -> torch.Tensor:
        """One model pass (1 NFE) over `tokens` at `positions` (a start offset or a list) -> `[T, V]`
        (`[1, V]`, the last position's, with `last_only`: a pass that uses no other logit).

        `tokens` may be a device tensor `[T]` (the on-device cycles: no host round trip). Its K/V are
        left pending in the cache: the mode commits what it keeps.
        """
        self.nfe += 1
        with torch.inference_mode():
            t, pos = self._inputs(tokens, positions)
            return self.model(t, pos, cache=self.cache, attn=attn, use_lora=use_lora, last_only=last_only)[0]

    def _inputs(self, tokens: list[int] | torch.Tensor, positions: int | list[int]) -> tuple[torch.Tensor, ...]:
        """`[1, T]` token and position tensors on the device (call under inference mode: every input an
        inference tensor, one kind for compiled passes)."""
        if torch.is_tensor(tokens):
            t = tokens.to(self.device, torch.long)[None]
        else:
            t = torch.tensor([tokens], dtype=torch.long, device=self.device)
        if isinstance(positions, int):
            return t, torch.arange(positions, positions + len(tokens), device=self.device)[None]
        return t, torch.tensor([positions], dtype=torch.long, device=self.device)

    def run(self, tokens: list[int], positions: int | list[int], attn: Attn, use_lora: bool = False,
            last_only: bool = False) -> "Picks":
        """`forward` and then the picks, as `Picks` (call it with the rows to pick). On the torch engine
        the picks are made inside the pass, greedy or sampled (one host transfer of ids and confidences,
        never the `[T, V]` logits; not for top-p alone, `sampling.in_pass`); otherwise the sampler picks
        from the logits. Either way a row's random number is the sampler's for the position the row
        picks for (`targets`)."""
        # only a sampled pick reads them (`Picks.draws`): a greedy pass builds no list
        targets = self.targets(tokens, positions, last_only) if self.sampler.params.temperature > 0 else None
        if self.picks_in_pass:
            p = self.sampler.params
            sample = dataclasses.replace(p, seed=None) if p.temperature > 0 else None  # the seed: in `draw`
            with torch.inference_mode():
                t, pos = self._inputs(tokens, positions)
                self.nfe += 1
                return Picks(self, targets, packed=self.model(
                    t, pos, cache=self.cache, attn=attn, use_lora=use_lora, last_only=last_only, pick=self.mask_id,
                    sample=sample, draw=self.sampler.key() if sample is not None else None))
        return Picks(self, targets, logits=self.forward(tokens, positions, attn, use_lora, last_only))

    def targets(self, tokens: list[int] | torch.Tensor, positions: int | list[int], last_only: bool) -> list[int]:
        """The position each row's pick is for, which keys its random number (`sampling.uniforms`): a
        token's next position, a mask's own (decoding.md). So a sampled AR step and the verify row of a
        speculative cycle for the same position draw the same number, and seeded LinearSpec /
        QuadraticSpec equal seeded AR token for token; a draft's row draws its verify row's number too.
        Tokens given as a device tensor are a draft's picks, never masks (LinearSpec's verify pass)."""
        n = int(tokens.shape[-1]) if torch.is_tensor(tokens) else len(tokens)
        pos = range(positions, positions + n) if isinstance(positions, int) else positions
        if torch.is_tensor(tokens):
            out = [q + 1 for q in pos]
        else:
            out = [q + (tok != self.mask_id) for tok, q in zip(tokens, pos)]
        return out[-1:] if last_only else out

    @property
    def picks_in_pass(self) -> bool:
        """Greedy picks in every torch pass; sampled ones in compiled passes, where the random numbers'
        ~70 integer ops fuse into the pass (eagerly they cost ~150 us a pass; the sampler makes them
        on the host from the logits, the same numbers)."""
        p = self.sampler.params
        return (self.rules is None and in_pass(p) and getattr(self.model, "picks_in_pass", False)
                and (p.temperature == 0 or getattr(self.model, "compiled", False)))

    # -- the stream
    @property
    def remaining(self) -> int:
        return self.opts.max_new_tokens - self.stream_len

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, tokens: list[int]) -> Emit:
        """Append `tokens` to the stream, cut at the first EOS and at the budget; set `finish_reason`."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        kept = tokens[:self.remaining]
        if self.eos_id in kept:
            kept = kept[:kept.index(self.eos_id) + 1]
            self.finish_reason = "stop"
        self.stream_len += len(kept)
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = "length"
        ids = kept[:-1] if self.finish_reason == "stop" else kept
        assert self.mask_id not in ids, "the mask token must never be emitted"
        lp = None
        if self.rules is not None:
            lp = self.rules.take_logprobs(self.stream_len - len(kept), len(ids))
            self.rules.accept(ids)
            if lp is not None:
                self.logprobs.extend(lp)
        self.output_ids.extend(ids)
        return Emit(ids, self.nfe, lp)

    def cycle(self, emitted: int) -> None:
        """Count one speculative cycle that emitted `emitted` tokens (for `mean_accepted`)."""
        self.cycles += 1
        self.cycle_tokens += emitted

    def prefill(self, prompt_ids: list[int]) -> int:
        """`F(prompt, causal)`, K/V kept; returns `t1 = pick(last logit)` (all modes but QuadraticSpec)."""
        picks = self.run(prompt_ids, self.cache.length, CAUSAL, last_only=True)
        self.cache.commit(len(prompt_ids))
        return picks()[0][0]


class Picks:
    """The picks of a pass, `picks(rows) -> (ids, confidences)` for `rows` (a slice or a list of
    row indices; None: every row), in the order given. Picks made in the pass come to the host once
    (`packed`: ids, confidences, finite); logits are picked by the sampler, only the rows asked for,
    each with its own random number (`Sampler`): the same tokens either way (rows drawn ahead on the
    device, `device_ids`, are those rows' picks when asked for)."""

    def __init__(self, dec: Decoder, targets: list[int] | None, *, logits: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None) -> None:
        self.dec, self.targets, self.logits, self.packed = dec, targets, logits, packed
        self.drawn: tuple[slice, torch.Tensor] | None = None  # rows the sampler drew ahead (`device_ids`)
        self.host: tuple[list[int], list[float]] | None = None

    def __call__(self, rows: slice | list[int] | None = None) -> tuple[list[int], list[float]]:
        if self.dec.rules is not None:  # each row for its context: nothing ahead of the stream
            return self.chain(rows, [], each=True)
        if self.packed is None and (self.drawn is None or rows != self.drawn[0]):
            self.dec.syncs += 1
            return self.dec.sampler.pick(self.logits if rows is None else self.logits[rows], self.draws(rows))
        if self.host is None:
            fetch(self)
        ids, conf = self.host
        if self.packed is None:  # the rows drawn ahead, as drawn
            return ids, conf
        idx = range(len(ids)) if rows is None else range(len(ids))[rows] if isinstance(rows, slice) else rows
        return [ids[i] for i in idx], [conf[i] for i in idx]

    @property
    def pending(self) -> torch.Tensor | None:
        """The device tensor `fetch` transfers: the in-pass picks, or the rows drawn ahead."""
        if self.host is not None:
            return None
        return self.packed if self.packed is not None else self.drawn[1] if self.drawn is not None else None

    def _load(self, h: list[float]) -> None:
        ids, conf, finite = unpack(h)
        if not finite:
            if self.logits is not None:
                raise nonfinite(self.logits.dtype)
            enc = getattr(self.dec.model, "encoder", None)  # the activations' dtype (norms are never quantized)
            raise nonfinite(enc.norm.weight.dtype if enc is not None else self.dec.cache.k.dtype)
        self.host = ids, conf

    def device_ids(self, rows: slice) -> torch.Tensor:
        """The picked ids of `rows` as a device tensor, without a host round trip: a next pass's tokens
        (LinearSpec's verify pass takes the draft's). Picks made in the pass are sliced; from logits the
        sampler draws these rows now, as a host pick of them would, and `fetch` brings them over."""
        if self.packed is None:
            ids, conf, finite = self.dec.sampler.pick_tensor(self.logits[rows], self.draws(rows))
            self.drawn = rows, pack(ids, conf, finite)
            return ids
        return packed_ids(self.packed)[rows]

    def chain(self, rows: slice | list[int] | None, prefix: list[int],
              each: bool = False) -> tuple[list[int], list[float]]:
        """Drafted rows, in order: row i sees `prefix` and the picks of the rows before it (with
        `each`, `prefix` alone). Without rules, the plain picks."""
        if self.dec.rules is None:
            return self(rows)
        idx = self._rows(rows if rows is not None else slice(None))
        if each:
            out = [self.dec.rules.chain(self, [r], prefix) for r in idx]
            return [i for o in out for i in o[0]], [c for o in out for c in o[1]]
        return self.dec.rules.chain(self, idx, prefix)

    def verify(self, rows: slice | list[int], prefix: list[int], drafted: list[int]) -> tuple[list[int], list[float]]:
        """Verifying rows: row i sees `prefix + drafted[:i]` (rows past the first rejected draft are
        not used). Without rules, the plain picks."""
        if self.dec.rules is None:
            return self(rows)
        return self.dec.rules.verify(self, self._rows(rows), prefix, drafted)

    def _rows(self, rows: slice | list[int]) -> list[int]:
        """The indices of `rows` in the pass."""
        return list(range(self.logits.shape[0])[rows]) if isinstance(rows, slice) else list(rows)

    def draws(self, rows: slice | list[int] | None = None) -> list[int] | None:
        """The counters of `rows`' random numbers: the positions they pick for (`Decoder.targets`);
        None for a greedy pass, which draws none."""
        if self.targets is None or rows is None:
            return self.targets
        return [self.targets[i] for i in self._rows(rows)]

def fetch(*picks: Picks) -> None:
    """Bring several passes' picks (made in the pass, or drawn ahead) to the host in one synchronization."""
    parts = [(p, t) for p in picks if (t := p.pending) is not None]
    if not parts:
        return
    parts[0][0].dec.syncs += 1
    h = torch.cat([t for _, t in parts]).tolist()
    at = 0
    for p, t in parts:
        p._load(h[at:at + t.shape[0]])
        at += t.shape[0]
