"""`pick(logits)` from the decoding contract.

The mask token is never a candidate. Temperature 0 is argmax (ties to the lowest id). Temperature
T > 0 samples from `softmax(logits / T)` after top-k / top-p filtering. The confidence of a pick is
its probability under the *untempered* softmax with the mask logit removed.
"""

from __future__ import annotations

import dataclasses
import math
import secrets

import torch

from edge_dlm.primitives.errors import UserError


MAX_TEMPERATURE = 100.0  # beyond it sampling is uniform noise


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None

    def validate(self) -> None:
        """Ranges that keep every probability finite: a finite temperature up to `MAX_TEMPERATURE` (any
        positive one is safe: logits are shifted by their maximum before dividing), top-p in (0, 1] (the
        most likely token always survives), a 64-bit seed."""
        if not _number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise UserError(f"--temperature must be a number in 0..{MAX_TEMPERATURE:g}, got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise UserError(f"--top-k must be an integer >= 0, got {self.top_k!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 1 << 64):
            raise UserError(f"--seed must be an integer in 0..2**64-1, got {str(self.seed)[:40]}")


class Sampler:
    """Applies `pick` row-wise. Its random numbers are a function of (seed, the position a row picks
    for) (`uniforms`, `Decoder.targets`), not a stream: a seed reproduces a whole run, a row's draw does
    not depend on which other rows of its pass are picked or in what order, and a compiled pass that picks inside itself (`Decoder.run`)
    draws exactly what this sampler would from the pass's logits."""

    def __init__(self, params: SamplingParams, mask_id: int, device: torch.device | str = "cpu") -> None:
        params.validate()
        self.params = params
        self.mask_id = mask_id
        self.device = torch.device(device)
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.calls = 0  # picks asked for without counters each draw as a pass of their own

    def key(self) -> torch.Tensor:
        """The device tensor a pass that draws inside itself reads (`uniforms`): the hash of the seed, and
        0 added to each row's counter (the position the row picks for, `Decoder.targets`)."""
        return torch.tensor([self.draw_hash, 0], dtype=torch.long, device=self.device)

    @property
    def draw_hash(self) -> int:
        """The 32-bit key of every counted draw (`pick_tensor` with `draws`, `key`)."""
        return pass_hash(self.seed, 0)

    def pick(self, logits: torch.Tensor, draws: list[int] | None = None) -> tuple[list[int], list[float]]:
        """`logits [T, V]` -> (token ids, confidences), one per row, in one host transfer."""
        ids, conf, finite = unpack(pack(*self.pick_tensor(logits, draws)).tolist())
        if not finite:
            raise nonfinite(logits.dtype)
        return ids, conf

    def pick_tensor(self, logits: torch.Tensor,
                    draws: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids `[T]`, confidences `[T]`, whether every logit is finite) on the logits' device, with no
        host synchronization (but `draw`'s for top-p alone): `choose` with this sampler's random
        numbers, row i's counted by `draws[i]` (a decoder's: the position the row picks for, the same
        number whichever pass picks for that position; `key` gives a pass the same), computed here
        (`host_uniforms`: a few microseconds, where `uniforms`' tensor ops cost ~150 eagerly). Without
        `draws`, each call draws as a pass of its own (rows 0 .. T-1 of a fresh key)."""
        u = None
        if self.params.temperature > 0:
            if draws is None:
                h, draws = pass_hash(self.seed, (1 << 31) + self.calls), range(logits.shape[0])
                self.calls += 1
            else:
                h = self.draw_hash
            u = torch.tensor(host_uniforms(h, draws), dtype=torch.float64, device=logits.device)[:, None]
        return choose(logits, self.mask_id, self.params, u)


def in_pass(params: SamplingParams) -> bool:
    """Whether a pass can make these picks inside itself: no host synchronization (top-p alone grows its
    candidates by reading their mass, `draw`)."""
    return params.temperature == 0 or params.top_k > 0 or params.top_p == 1.0


def choose(logits: torch.Tensor, mask_id: int, params: SamplingParams,
           u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoding contract's pick per row of `logits [R, V]` -> (ids, confidences, all finite), on the
    device: greedy at temperature 0, else drawn with the uniform numbers `u [R, 1]` (float64, `uniforms`).
    Non-finite logits are drawn from as zeros (a NaN never reaches the draw) and reported by the flag,
    for the caller to raise `nonfinite`."""
    finite = all_finite(logits)
    logits = torch.where(finite, logits.float(), 0.0)  # a copy: the mask below never edits the pass's
    logits[..., mask_id] = float("-inf")
    probs = torch.softmax(logits, dim=-1)  # untempered: the confidence
    if params.temperature == 0:
        tokens = torch.argmax(logits, dim=-1)  # first maximal index on ties
    else:
        # shifted by the maximum (<= 0), dividing by a tiny T cannot overflow; T below float32's
        # smallest normal would round to 0 (0 / 0), and samples as greedily as that smallest one
        t = max(params.temperature, torch.finfo(torch.float32).tiny)
        tokens = draw((logits - logits.amax(dim=-1, keepdim=True)).div_(t), params, u)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1), finite


def draw(scaled: torch.Tensor, p: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """One token per row of tempered logits `scaled [R, V]` (maximum 0) from their softmax after
    top-k / top-p filtering (`filtered_probs` is the reference), by inverse CDF: the row's uniform
    number `u [R, 1]` against the cumulative probabilities (float64) of the candidates.

    The candidates are the top-k tokens (exactly k, in descending order); for top-p alone the top
    256, else 4096, else all of them, whichever first holds the nucleus's mass in every row; the
    whole vocabulary in its order when neither filter is on. Sorting a 131072-token vocabulary
    per row cost ~9 ms on a CPU core, and torch's `multinomial` drew 131072 exponentials per row
    (~2 ms). Growing the top-p candidates reads one flag from the device per size tried (no sync
    with top-k set); a row's token is the same whichever size held its nucleus."""
    v = scaled.shape[-1]
    top_k = p.top_k if 0 < p.top_k < v else 0
    if not top_k and p.top_p == 1.0:
        index, weights = None, torch.softmax(scaled, dim=-1)
    else:
        full = None if top_k else torch.softmax(scaled, dim=-1)  # top-p alone: the vocabulary's mass
        k = top_k or min(v, 256)
        while True:
            values, index = torch.topk(scaled, k, dim=-1)  # sorted, descending
            mass = None if top_k else full.gather(-1, index)
            if top_k or k == v or bool((mass.sum(-1) >= p.top_p).all()):
                break
            k = v if k >= 4096 else min(v, 16 * k)  # 256, 4096, all: a wide nucleus is a sort
        weights = torch.softmax(values, dim=-1)  # renormalized over the candidates (top-k)
        if p.top_p < 1.0:  # drop a token once the mass before it reaches p; the most likely stays
            mass = weights if top_k else mass
            drop = mass.cumsum(-1) - mass >= p.top_p
            drop[..., 0] = False
            weights = weights.masked_fill(drop, 0.0)
    j = inverse_cdf(weights, u)
    return (j if index is None else index.gather(-1, j)).squeeze(-1)


_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3's 32-bit finalizer: each input bit flips each output bit
# with probability ~1/2. Twice here: on Python ints for the host (`fmix32`) and on int64 tensors for a pass
# that draws inside itself (`_fmix`); `tests/test_sampling.py` holds them equal.


def fmix32(x: int) -> int:
    x = ((x ^ (x >> 16)) * _C1) & _M32
    x = ((x ^ (x >> 13)) * _C2) & _M32
    return x ^ (x >> 16)


def pass_hash(seed: int, pass_no: int) -> int:
    """A pass's 32-bit key: the seed's two halves and the pass number, hashed (on the host, once a pass)."""
    return fmix32(seed & _M32 ^ fmix32((seed >> 32) ^ fmix32(pass_no & _M32)))


def host_uniforms(h: int, rows) -> list[float]:
    """`uniforms` on the host: row r's number in [0, 1) of the pass keyed `h`, from 53 hashed bits
    (exact in float64, so both give the same bits)."""
    out = []
    for r in rows:
        a, b = fmix32(h ^ fmix32(2 * r)), fmix32(h ^ fmix32(2 * r + 1))
        out.append((((a >> 5) << 26) + (b >> 6)) * 2.0 ** -53)
    return out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`x * c mod 2**32` for int64 `x` below 2**32, no product past 2**48 (int64 overflow is undefined
    in the C++ a compiled pass becomes)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix(x: torch.Tensor) -> torch.Tensor:
    x = _mul32(x ^ (x >> 16), _C1)
    x = _mul32(x ^ (x >> 13), _C2)
    return x ^ (x >> 16)


def uniforms(key: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A counter-based random number per row, in [0, 1): float64 `[R, 1]` for int64 `rows [R]` (their
    counters, the positions they pick for, plus `key[1]`) and `key[0]` the seed's hash (`Sampler.key`):
    `host_uniforms` in plain integer tensor ops, so a compiled pass draws them itself, on any device,
    with no generator state to carry."""
    r = (rows + key[1]) * 2
    a, b = _fmix(key[0] ^ _fmix(r)), _fmix(key[0] ^ _fmix(r + 1))
    return (((a >> 5) << 26) + (b >> 6)).double().mul_(2.0 ** -53)[:, None]


CDF_CHUNK = 1024  # a vocabulary-wide draw: the chunk first (its sum), then the token within it


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of `weights [R, N]` (>= 0, not all 0), the index `[R, 1]` of the first position whose
    cumulative weight (in float64) exceeds `u [R, 1]` (in [0, 1)) times the row's total: a draw in
    proportion to the weights, never of a zero weight. Past `4 * CDF_CHUNK` positions it sums chunks
    first and takes one chunk's cumulative sums (a float64 copy and cumsum of a whole 131072-token row
    cost ~1.5 ms on a CPU core, several times the rest of the draw)."""
    r, n = weights.shape
    if n <= 4 * CDF_CHUNK:
        cdf = weights.double().cumsum(-1)
        return torch.minimum(torch.searchsorted(cdf, u * cdf[:, -1:], right=True), _last(cdf))
    pad = -n % CDF_CHUNK
    chunks = torch.nn.functional.pad(weights, (0, pad)).view(r, -1, CDF_CHUNK)
    sums = chunks.sum(-1).double().cumsum(-1)  # [R, C], the last one the total (a chunk summed in
    # float32: ~1e-7 of its weight, the weights' own rounding; a float64 sum copied the whole row)
    target = u * sums[:, -1:]
    c = torch.minimum(torch.searchsorted(sums, target, right=True), _last(sums))  # a chunk whose sum is > 0
    inner = chunks.gather(1, c[..., None].expand(r, 1, CDF_CHUNK)).squeeze(1).cumsum(-1, dtype=torch.float64)
    before = torch.where(c > 0, sums.gather(-1, (c - 1).clamp(min=0)), 0.0)
    # in the chunk's own sums (another rounding than `sums`): kept below their total, so the first
    # position above it has a weight > 0
    rest = torch.minimum(target - before, torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:])))
    j = torch.searchsorted(inner, rest.clamp(min=0), right=True)
    return c * CDF_CHUNK + j


def _last(cdf: torch.Tensor) -> torch.Tensor:
    """The first position where cumulative sums `[R, N]` reach their total: the last positive weight
    (where `u * total` rounds up to the total itself)."""
    return (cdf < cdf[:, -1:]).sum(-1, keepdim=True)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of `t` is finite, as a device flag: a NaN or an infinity shows in its minimum
    or maximum (one read, no copy; `isfinite(t).all()` made three passes and a tensor of flags)."""
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def pack(ids: torch.Tensor, conf: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """A pass's picks as the one tensor its host transfer reads: float64 `[2R + 1]` = the R ids, the R
    confidences, 1.0 if every logit was finite else 0.0 (ids are exact in float64)."""
    return torch.cat([ids.double(), conf.double(), finite.double()[None]])


def unpack(h: list[float]) -> tuple[list[int], list[float], bool]:
    """`pack`'s tensor, transferred (`.tolist()`) -> (ids, confidences, all finite)."""
    n = (len(h) - 1) // 2
    return [int(x) for x in h[:n]], h[n:2 * n], bool(h[-1])


def packed_ids(packed: torch.Tensor) -> torch.Tensor:
    """The ids of `pack`'s tensor, on its device (int64 `[R]`)."""
    return packed[:(packed.shape[0] - 1) // 2].long()


def pack_first(packed: torch.Tensor, n: int) -> torch.Tensor:
    """`pack`'s tensor of the first `n` rows only."""
    r = (packed.shape[0] - 1) // 2
    return packed if n == r else torch.cat([packed[:n], packed[r:r + n], packed[-1:]])


def pack_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """`pack`'s tensors of consecutive rows as one."""
    rows = [(p.shape[0] - 1) // 2 for p in parts]
    return torch.cat([p[:r] for p, r in zip(parts, rows)] + [p[r:2 * r] for p, r in zip(parts, rows)]
                     + [torch.stack([p[-1] for p in parts]).amin()[None]])


def nonfinite(dtype: torch.dtype) -> UserError:
    """The one-line error for a pass whose logits hold NaN or infinity."""
    return UserError("the model produced NaN or infinite logits: its weights overflow in "
                     f"{str(dtype).removeprefix('torch.')}; try --dtype float32, or the checkpoint is damaged")


def filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of `logits [T, V]` restricted to the top-k, then to the smallest top-p nucleus, over the
    whole vocabulary: the reference `Sampler.draw`'s candidates are tested against."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before this token is >= p
        drop[..., 0] = False  # the most likely token always stays (a p below float32's range is 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)
