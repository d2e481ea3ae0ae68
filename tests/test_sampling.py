"""The sampler's draws (`edge_dlm.primitives.sampling`): a sampled pick follows `softmax(logits / T)`
after top-k / top-p filtering (`filtered_probs`, the reference over the whole vocabulary), never draws a
token of probability 0 (the mask, a filtered one), and the inverse-CDF draw behind it picks each
position in proportion to its weight, through a vocabulary's chunks as directly."""

from __future__ import annotations

import pytest
import torch

from edge_dlm.primitives import sampling
from edge_dlm.primitives.sampling import Sampler, SamplingParams, filtered_probs, inverse_cdf

MASK = 3


def lm_logits(v: int, seed: int = 0, flat: float = 2.0) -> torch.Tensor:
    """A few strong candidates over a long tail (`flat` widens the tail), as a language model gives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(v, generator=g) * flat
    x[torch.randperm(v, generator=g)[:12]] += torch.linspace(9, 3, 12)
    return x


def expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = logits.clone()
    x[MASK] = float("-inf")
    return filtered_probs(((x - x.max()) / p.temperature)[None], p.top_k, p.top_p)[0]


def drawn(logits: torch.Tensor, p: SamplingParams, n: int) -> torch.Tensor:
    s, out = Sampler(p, MASK), []
    for _ in range(0, n, 2000):  # one row drawn 2000 times a pass
        ids, conf, finite = s.pick_tensor(logits.expand(2000, -1))
        assert bool(finite)
        out.append(ids)
    return torch.cat(out)[:n]


CASES = [SamplingParams(1.0, 0, 1.0, 1), SamplingParams(0.7, 40, 1.0, 2), SamplingParams(0.8, 0, 0.9, 3),
         SamplingParams(1.2, 25, 0.8, 4), SamplingParams(1.0, 0, 0.97, 5), SamplingParams(0.9, 0, 1e-300, 6)]


@pytest.mark.parametrize("p", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("v", [300, 9000])  # one chunk; many chunks (the two-level draw), a nucleus past 256
def test_draws_follow_the_filtered_softmax(p, v):
    logits = lm_logits(v, flat=3.0 if p.top_p == 0.97 else 2.0)
    want = expected(logits, p)
    n = 30000
    ids = drawn(logits, p, n)
    assert bool((want[ids] > 0).all())  # never a token the filters (or the mask) removed
    freq = torch.bincount(ids, minlength=v).double() / n
    top = torch.argsort(want, descending=True)[:20]  # the likely tokens one by one, the rest together
    bins_want = torch.cat([want[top].double(), (1 - want[top].sum()).double().clamp(min=0)[None]])
    bins_got = torch.cat([freq[top], (1 - freq[top].sum()).clamp(min=0)[None]])
    sd = (bins_want * (1 - bins_want) / n).sqrt()
    assert bool(((bins_got - bins_want).abs() <= 5 * sd + 1e-4).all()), (bins_got - bins_want).abs().max()


def test_a_wide_nucleus_grows_the_candidates_to_the_whole_vocabulary():
    """A flat distribution's nucleus holds most of the vocabulary: 256 candidates, then 4096, then all."""
    v = 6000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(9)) * 0.1
    p = SamplingParams(1.0, 0, 0.99, 7)
    want = expected(logits, p)
    assert int((want > 0).sum()) > 4096
    ids = drawn(logits, p, 20000)
    assert bool((want[ids] > 0).all()) and len(ids.unique()) > 4096


def test_the_same_seed_draws_the_same_tokens():
    logits = lm_logits(9000).expand(8, -1)
    p = SamplingParams(0.8, 0, 0.9, 11)
    assert torch.equal(Sampler(p, MASK).pick_tensor(logits)[0], Sampler(p, MASK).pick_tensor(logits)[0])


@pytest.mark.parametrize("n", [12, 4096, 5000, 3 * sampling.CDF_CHUNK + 5 + 4 * sampling.CDF_CHUNK])
def test_inverse_cdf_picks_the_first_position_past_the_target(n):
    """Integer weights (exact sums): the chunked draw agrees with a direct search on every target, zero
    weights are never picked, and the ends of [0, 1) land on the first and last positive weights."""
    g = torch.Generator().manual_seed(n)
    w = torch.randint(0, 4, (3, n), generator=g).float()
    w[:, :5] = 0  # zeros at the start, at chunk edges, at the end
    w[:, -3:] = 0
    w[:, sampling.CDF_CHUNK - 1:sampling.CDF_CHUNK + 1] = 0
    u = torch.rand(3, 500, generator=g, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    u[:, 0], u[:, 1] = 0.0, torch.nextafter(one, torch.zeros_like(one))
    cdf = w.double().cumsum(-1)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    got = torch.stack([inverse_cdf(w, u[:, i:i + 1])[:, 0] for i in range(u.shape[1])], dim=1)
    assert torch.equal(got, want)
    assert bool((w.gather(1, got) > 0).all())
    nz = [torch.nonzero(row)[[0, -1], 0] for row in w]
    assert got[:, 0].tolist() == [int(a) for a, _ in nz] and got[:, 1].tolist() == [int(b) for _, b in nz]
    top = inverse_cdf(w, torch.ones(3, 1, dtype=torch.float64))  # u * total rounding up to the total
    assert top[:, 0].tolist() == [int(b) for _, b in nz]


def test_the_host_and_the_pass_make_the_same_random_numbers():
    """`host_uniforms` (the sampler's) and `uniforms` (a pass's, compiled too) agree bit for bit, and
    the numbers look uniform and independent across rows and passes."""
    from edge_dlm.primitives.sampling import host_uniforms, pass_hash, uniforms

    for seed in (0, 1, 2**63 + 12345, 2**64 - 1):
        for pass_no in (0, 1, 77, 2**31 + 5):
            h = pass_hash(seed, pass_no)
            key = torch.tensor([h, 3])
            got = uniforms(key, torch.arange(40))
            assert got.dtype == torch.float64 and got.shape == (40, 1)
            assert got[:, 0].tolist() == host_uniforms(h, range(3, 43))
    compiled = torch.compile(uniforms, fullgraph=True, dynamic=False)
    key = torch.tensor([pass_hash(5, 9), 0])
    assert torch.equal(compiled(key, torch.arange(64)), uniforms(key, torch.arange(64)))
    u = torch.tensor([host_uniforms(pass_hash(7, p), range(500)) for p in range(200)], dtype=torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.flatten(), 50, 0, 1)  # 100000 numbers in 50 bins: chi-square, 49 degrees
    assert float(((counts - 2000) ** 2 / 2000).sum()) < 100
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.02  # rows
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.02  # passes


def test_a_pass_greedy_picks_are_the_samplers():
    """`nld.greedy` (greedy picks inside a pass) and `choose` at temperature 0 (the sampler's): the same
    ids (ties to the lowest id, the mask never), confidences and finite flag."""
    from edge_dlm.model.nld import greedy
    from edge_dlm.primitives.sampling import choose, pack

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g)
    logits[0, MASK] = 50.0  # the mask the largest: never picked
    logits[1, [7, 9]] = 40.0  # a tie: the lower id
    logits[2] = 0.0  # all equal
    assert torch.equal(greedy(logits, MASK), pack(*choose(logits, MASK, SamplingParams(), None)))
    bad = logits.clone()
    bad[4, 5] = float("nan")
    assert greedy(bad, MASK)[-1].item() == 0.0 == pack(*choose(bad, MASK, SamplingParams(), None))[-1].item()
