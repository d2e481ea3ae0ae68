"""Sampled decoding against greedy, eager and compiled, on the demo model: tokens/s of AR and LinearSpec
at temperature 0, at temperature 0.8 with top-k 40 (picked inside a compiled pass) and with top-p 0.9
alone (drawn from the logits after the pass), best of `--rounds`, each configuration warmed up first.

    .venv/bin/python scripts/bench_sampled_decode.py [--device cpu|cuda] [--threads 1] [--tokens 300]

What to read: a compiled pass's sampled/greedy ratio (the random numbers and the draw fused into the
pass) against eager's (drawn after it). LinearSpec's sampled rows accept a different number of draft
tokens than its greedy ones, so only AR compares speeds across sampling settings.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

SETTINGS = {"greedy": dict(temperature=0.0), "top-k 40": dict(temperature=0.8, top_k=40, seed=1),
            "top-p 0.9": dict(temperature=0.8, top_p=0.9, seed=1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    from benchlib import interleaved
    from edge_dlm.runtime import load

    torch.set_num_threads(a.threads)
    prompt = "Tell me a story about the sea"
    print(f"demo model, {a.device}, {a.threads} thread(s), {a.tokens} tokens, best of {a.rounds}\n")
    print("| passes | mode | " + " | ".join(f"{s} tok/s" for s in SETTINGS) + " | top-k / greedy |")
    print("|---|---|" + "---|" * (len(SETTINGS) + 1))
    for comp in ("off", "on"):
        rt = load(device=a.device, compile=comp)
        for mode in ("ar", "linear-spec"):
            for kw in SETTINGS.values():
                rt.generate(prompt, mode=mode, max_new_tokens=64, **kw)  # warm-up (compiles the shapes)

            def tok_s(kw):  # one answer's tokens a second, end to end
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                r = rt.generate(prompt, mode=mode, max_new_tokens=a.tokens, **kw)  # noqa: B023 (called now)
                return len(r.output_ids) / (time.perf_counter() - t)
            got = interleaved({name: functools.partial(tok_s, kw) for name, kw in SETTINGS.items()}, a.rounds)
            speed = {name: max(v) for name, v in got.items()}
            cells = " | ".join(f"{v:.0f}" for v in speed.values())
            print(f"| {'compiled' if comp == 'on' else 'eager'} | {mode} | {cells} | "
                  f"{speed['top-k 40'] / speed['greedy']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
