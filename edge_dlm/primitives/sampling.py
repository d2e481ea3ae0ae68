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
        host synchronization: non-finite logits are drawn from as zeros (`multinomial` never sees a NaN,
        a device-side assert on CUDA) and reported by the flag, for the caller to raise `nonfinite`."""
        finite = torch.isfinite(logits).all()
        logits = torch.where(finite, logits.float(), 0.0)  # a copy: the mask below never edits the pass's
        logits[..., self.mask_id] = float("-inf")
        probs = torch.softmax(logits, dim=-1)  # untempered: the confidence
        p = self.params
        if p.temperature == 0:
            tokens = torch.argmax(logits, dim=-1)  # first maximal index on ties
        else:
            # shifted by the maximum (<= 0), dividing by a tiny T cannot overflow; T below float32's
            # smallest normal would round to 0 (0 / 0), and samples as greedily as that smallest one
            shifted = logits - logits.amax(dim=-1, keepdim=True)
            t = max(p.temperature, torch.finfo(torch.float32).tiny)
            tokens = torch.multinomial(filtered_probs(shifted / t, p.top_k, p.top_p), 1,
                                       generator=self.generator).squeeze(-1)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1), finite


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
    """Softmax of `logits [T, V]` restricted to the top-k, then to the smallest top-p nucleus."""
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
