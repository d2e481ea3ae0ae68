"""Prefill with the output head for every prompt token vs for the last one only (what edge-dlm runs),
at a real NLD layer shape with random weights, alternated in one run. CPU or CUDA; ratios are what count
on a shared CPU machine.

    .venv/bin/python scripts/bench_prefill_head.py --shape 3b --layers 4 --tokens 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from benchlib import interleaved
from edge_dlm.cli.bench_shapes import random_model, shape_config
from edge_dlm.primitives.attention import CAUSAL
from edge_dlm.primitives.machine import machine_description, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3b", choices=["3b", "8b"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    set_threads(a.threads)
    model = random_model(shape_config(a.shape, a.layers), getattr(torch, a.dtype), torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens))
    pos = torch.arange(a.tokens)[None]
    def prefill(last_only: bool) -> float:
        cache = model.new_cache(a.tokens)
        t0 = time.perf_counter()
        model(ids, pos, cache=cache, attn=CAUSAL, last_only=last_only)
        return time.perf_counter() - t0
    with torch.inference_mode():  # the first round warms up
        times = interleaved({k: functools.partial(prefill, k) for k in (False, True)}, a.repeats, warmup=1)
    full, last = (statistics.median(times[k]) for k in (False, True))
    print(f"NLD-{a.shape} shape, {a.layers} layers, {a.dtype}, prefill of {a.tokens} tokens on "
          f"{machine_description('cpu')}: every token's logits {full * 1000:.0f} ms, the last token's only "
          f"{last * 1000:.0f} ms; {full / last:.2f}x faster")


if __name__ == "__main__":
    main()
