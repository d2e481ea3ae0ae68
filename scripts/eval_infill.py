#!/usr/bin/env python3
"""Fill in the middle vs AR on held-out code: exact-match rate of masked 1-8 token spans.

    .venv/bin/python scripts/eval_infill.py [--model DIR] [--samples 600] [--steps 1 2 4 8] [--json out.json]

Held-out files are the demo recipe's (every `holdout_every`-th stdlib file by path hash, never
trained on). Each sample takes a 32-token window of such a file, masks a span of k = 1..8 tokens
inside it (k cycles, the span's place in the window is random), and asks:

- infill: `Runtime.infill(prefix, suffix, length=k, steps=S)` with the prefix (up to 256 tokens before
  the span) and the rest of the window as suffix (the masks see its first B - k tokens);
- AR: greedy AR continuation of k tokens from the same prefix (it never sees the suffix).

A span counts as an exact match when all k tokens equal the original. Token accuracy is reported too.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import edge_dlm  # noqa: E402
from train_demo import is_held_out, stdlib_files  # noqa: E402

WINDOW = 32
PREFIX = 256


def samples(tok, n: int, seed: int, holdout_every: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prefix, span, suffix) token lists from held-out files."""
    files = [p for p in stdlib_files(None) if is_held_out(p, holdout_every)]
    rng = random.Random(seed)
    streams = []
    for f in files:
        try:
            ids = tok.encode(f.read_text(encoding="utf-8")[:60000], add_special_tokens=False)
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) > 64 + WINDOW:
            streams.append(ids)
    out = []
    for i in range(n):
        ids = rng.choice(streams)
        k = 1 + i % 8
        w = rng.randrange(64, len(ids) - WINDOW)
        o = rng.randrange(0, WINDOW - k)  # at least one suffix token inside the window
        a = w + o
        out.append((ids[max(0, a - PREFIX):a], ids[a:a + k], ids[a + k:w + WINDOW]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the bundled demo model)")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout-every", type=int, default=50, help="the recipe's held-out split")
    ap.add_argument("--json", help="write the numbers here too")
    a = ap.parse_args()
    rt = edge_dlm.load(a.model, device="cpu", dtype="float32")
    data = samples(rt.tokenizer, a.samples, a.seed, a.holdout_every)
    t0 = time.perf_counter()
    rows = {"ar": [0, 0, 0]} | {f"infill S={s}": [0, 0, 0] for s in a.steps}  # exact, correct tokens, nfe
    buckets: dict[str, dict[str, list[int]]] = {}
    for prefix, span, suffix in data:
        k = len(span)
        bucket = "1-2" if k <= 2 else "3-4" if k <= 4 else "5-8"
        runs = {"ar": rt.generate(prefix, mode="ar", max_new_tokens=k)}
        for s in a.steps:
            runs[f"infill S={s}"] = rt.infill(prefix, suffix, length=k, steps=min(s, rt.config.block_size))
        for name, r in runs.items():
            got = r.output_ids
            exact = got == span
            rows[name][0] += exact
            rows[name][1] += sum(x == y for x, y in zip(got, span))
            rows[name][2] += r.nfe
            b = buckets.setdefault(bucket, {}).setdefault(name, [0, 0])
            b[0] += exact
            b[1] += 1
    total = sum(len(s) for _, s, _ in data)
    n = len(data)
    out = {"model": str(rt.path), "samples": n, "span_tokens": total, "seconds": round(time.perf_counter() - t0, 1),
           "rows": {name: {"exact_match": round(v[0] / n, 4), "token_accuracy": round(v[1] / total, 4),
                           "mean_nfe": round(v[2] / n, 2)} for name, v in rows.items()},
           "by_span_length": {b: {name: round(v[0] / v[1], 4) for name, v in d.items()} for b, d in sorted(buckets.items())}}
    print(f"{n} spans ({total} tokens) from held-out files, {out['seconds']} s")
    print(f"{'method':<14} {'exact match':>11} {'token acc':>9} {'NFE':>6}   " +
          "   ".join(f"k {b}" for b in out["by_span_length"]))
    for name, r in out["rows"].items():
        per = "   ".join(f"{out['by_span_length'][b][name]:.3f}" for b in out["by_span_length"])
        print(f"{name:<14} {r['exact_match']:>11.3f} {r['token_accuracy']:>9.3f} {r['mean_nfe']:>6.2f}   {per}")
    if a.json:
        from benchlib import record

        record(a.json, out if isinstance(out, dict) else {"rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
