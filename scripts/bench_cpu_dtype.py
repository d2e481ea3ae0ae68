"""Why `--dtype auto` keeps a large bf16 checkpoint in bf16 on a CPU: an AR step's cost with float32 vs
bfloat16 weights, on a random model of a real shape, interleaved (each round times both), 1 thread.

    .venv/bin/python scripts/bench_cpu_dtype.py [--shape 3b] [--layers 2] [--rounds 5] [--context 256]

Both models run as the runtime loads them on a CPU (`Backend(cpu=True).apply`: bf16 linears through the
bf16 kernel; float32 through torch), greedy picks in the pass, after a prefill of `--context` tokens.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="3b", choices=("3b", "8b"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--context", type=int, default=256)
    a = p.parse_args()

    from edge_dlm.cli.bench_shapes import random_model, shape_config
    from benchlib import interleaved, seconds
    from edge_dlm.kernels.backend import Backend
    from edge_dlm.primitives.attention import CAUSAL

    torch.set_num_threads(1)
    cfg = shape_config(a.shape, a.layers)
    models, caches = {}, {}
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            m = random_model(cfg, dt, torch.device("cpu"))
            Backend(cpu=True).apply(m)
            c = m.new_cache(a.context + 64)
            m(torch.randint(200, 1000, (1, a.context)), torch.arange(a.context)[None], cache=c, attn=CAUSAL,
              last_only=True)
            c.commit(a.context)
            models[dt], caches[dt] = m, c
        def steps(m, c):  # 8 AR steps
            for _ in range(8):
                m(torch.tensor([[300]]), torch.tensor([[c.length]]), cache=c, attn=CAUSAL, pick=cfg.mask_token_id)
                c.commit(0)
        got = interleaved({dt: seconds(functools.partial(steps, m, caches[dt])) for dt, m in models.items()},
                          a.rounds, warmup=1)
        got = {dt: [t / 8 for t in ts] for dt, ts in got.items()}
    med = {dt: statistics.median(v) for dt, v in got.items()}
    print(f"NLD-{a.shape} shape, {a.layers} layers, 1 thread, median of {a.rounds} interleaved rounds")
    for dt, s in med.items():
        print(f"  {str(dt).removeprefix('torch.'):9s} {s * 1e3:7.1f} ms per AR step")
    print(f"  float32 / bfloat16: {med[torch.float32] / med[torch.bfloat16]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
