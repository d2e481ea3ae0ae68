"""`pick(logits)` from the decoding contract.

The mask token is never a candidate. Temperature 0 is argmax (ties to the lowest id). Temperature
T > 0 samples from `softmax(logits / T)` after top-k / top-p filtering. The confidence of a pick is
its probability under the *untempered* softmax with the mask logit removed.
"""

from __future__ import annotations

import dataclasses
import math

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
        most likely token always survives), a seed torch's generator takes."""
        if not _number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise UserError(f"--temperature must be a number in 0..{MAX_TEMPERATURE:g}, got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise UserError(f"--top-k must be an integer >= 0, got {self.top_k!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 1 << 64):
            raise UserError(f"--seed must be an integer in 0..2**64-1, got {str(self.seed)[:40]}")


class Sampler:
    """Applies `pick` row-wise; holds the random generator so a seed reproduces a whole run."""

    def __init__(self, params: SamplingParams, mask_id: int, device: torch.device | str = "cpu") -> None:
        params.validate()
        self.params = params
        self.mask_id = mask_id
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def pick(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """`logits [T, V]` -> (token ids, confidences), one per row, in one host transfer."""
        ids, conf, finite = unpack(pack(*self.pick_tensor(logits)).tolist())
        if not finite:
            raise nonfinite(logits.dtype)
        return ids, conf

    def pick_tensor(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids `[T]`, confidences `[T]`, whether every logit is finite) on the logits' device, with no
        host synchronization (but `draw`'s for top-p alone): non-finite logits are drawn from as zeros
        (a NaN never reaches the draw) and reported by the flag, for the caller to raise `nonfinite`."""
        finite = all_finite(logits)
        logits = torch.where(finite, logits.float(), 0.0)  # a copy: the mask below never edits the pass's
        logits[..., self.mask_id] = float("-inf")
        probs = torch.softmax(logits, dim=-1)  # untempered: the confidence
        p = self.params
        if p.temperature == 0:
            tokens = torch.argmax(logits, dim=-1)  # first maximal index on ties
        else:
            # shifted by the maximum (<= 0), dividing by a tiny T cannot overflow; T below float32's
            # smallest normal would round to 0 (0 / 0), and samples as greedily as that smallest one
            t = max(p.temperature, torch.finfo(torch.float32).tiny)
            tokens = self.draw((logits - logits.amax(dim=-1, keepdim=True)).div_(t))
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1), finite

    def draw(self, scaled: torch.Tensor) -> torch.Tensor:
        """One token per row of tempered logits `scaled [R, V]` (maximum 0) from their softmax after
        top-k / top-p filtering (`filtered_probs` is the reference), by inverse CDF: one uniform number
        per row from the generator against the cumulative probabilities (float64) of the candidates.

        The candidates are the top-k tokens (exactly k, in descending order); for top-p alone the top
        256, else 4096, else all of them, whichever first holds the nucleus's mass in every row; the
        whole vocabulary in its order when neither filter is on. Sorting a 131072-token vocabulary
        per row cost ~9 ms on a CPU core, and torch's `multinomial` drew 131072 exponentials per row
        (~2 ms). Growing the top-p candidates reads one flag from the device per size tried (no sync
        with top-k set)."""
        p, v = self.params, scaled.shape[-1]
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
        u = torch.rand(weights.shape[0], 1, generator=self.generator, device=weights.device, dtype=torch.float64)
        j = inverse_cdf(weights, u)
        return (j if index is None else index.gather(-1, j)).squeeze(-1)


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
