"""A sampled pick on a real-size vocabulary: `Sampler.pick_tensor` against the reference draw (the whole
vocabulary filtered by `filtered_probs`, which sorts it for top-p, then `torch.multinomial`: what the
sampler did before), milliseconds per pick, median of `--rounds` interleaved rounds.

    .venv/bin/python scripts/bench_sampler.py [--vocab 131072] [--rows 1 16] [--threads 1] [--device cuda]

Two kinds of logits over a Gaussian tail (sd 2): `peaked`, a dozen tokens 8-18 above it, as a trained
model gives (the top-p nucleus is a few tokens); `flat`, the tail alone, as random weights give (the
nucleus is most of the vocabulary).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch

CASES = [(0.0, 0, 1.0), (0.8, 0, 1.0), (0.8, 50, 1.0), (0.8, 50, 0.9), (0.8, 0, 0.9), (0.8, 0, 0.95)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_pick(logits: torch.Tensor, p, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    from edge_dlm.primitives.sampling import filtered_probs

    x = torch.where(torch.isfinite(logits).all(), logits.float(), 0.0)
    x[..., mask_id] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    if p.temperature == 0:
        tokens = torch.argmax(x, dim=-1)
    else:
        shifted = x - x.amax(dim=-1, keepdim=True)
        tokens = torch.multinomial(filtered_probs(shifted / p.temperature, p.top_k, p.top_p), 1,
                                   generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from benchlib import interleaved
    from edge_dlm.primitives.sampling import Sampler, SamplingParams

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print(f"vocabulary {a.vocab}, {a.device}, {a.threads} thread(s); ms per pick, median of {a.rounds} rounds\n")
    print("| logits | rows | temperature / top-k / top-p | reference (filter + multinomial) | Sampler | |\n"
          "|---|---|---|---|---|---|")
    for kind, rows in [(k, r) for k in ("peaked", "flat") for r in a.rows]:
        x = torch.randn(rows, a.vocab, generator=g) * 2.0
        if kind == "peaked":
            x[:, torch.randperm(a.vocab, generator=g)[:12]] += torch.linspace(18, 8, 12)
        x = x.to(a.device)
        def timed(f):  # ms a pick, 5 picks after one untimed
            f()
            sync(a.device)
            t0 = time.perf_counter()
            for _ in range(5):
                f()
            sync(a.device)
            return (time.perf_counter() - t0) / 5 * 1e3
        fns = {}
        for t, k, top_p in CASES:
            p = SamplingParams(t, k, top_p, 1)
            s = Sampler(p, 3, device=a.device)
            ref_gen = torch.Generator(device=a.device).manual_seed(1)
            fns[(t, k, top_p, "ref")] = functools.partial(timed, functools.partial(reference_pick, x, p, 3, ref_gen))
            fns[(t, k, top_p, "new")] = functools.partial(timed, functools.partial(s.pick_tensor, x))
        got = interleaved(fns, a.rounds)
        for t, k, top_p in CASES:
            ref, new = (statistics.median(got[(t, k, top_p, n)]) for n in ("ref", "new"))
            what = "greedy" if t == 0 else f"{t} / {k or '-'} / {top_p if top_p < 1 else '-'}"
            print(f"| {kind} | {rows} | {what} | {ref:.2f} | {new:.2f} | {ref / new:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
