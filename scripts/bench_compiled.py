"""Compiled step functions vs eager, on one model, alternately in one run (`--compile on` vs `off`,
and the onnxruntime engine when one is given): tokens/s per mode, cold compile and warm start.

    .venv/bin/python scripts/bench_compiled.py [--model DIR] [--onnx DIR] [--rounds 5] [--tokens 400]

Each round runs every configuration once per mode, in turn (so a busy neighbour slows all alike);
the table shows the median of the rounds and the ratio to eager. Start-up: a fresh process with
`--compile on` and an empty compile cache (cold), the same again (warm: inductor's kernels are cached),
and one with `--compile off`, each generating 16 tokens; wall seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Write a long story about a lighthouse keeper and the sea"
MODES = ("ar", "linear-spec", "diffusion", "quadratic-spec")


def start_seconds(model: str | None, compile_: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "edge_dlm.cli", "generate", "--prompt", PROMPT, "--mode", "ar",
           "--max-new-tokens", "16", "--compile", compile_, "--device", "cpu"] + (["--model", model] if model else [])
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--onnx", help="an ONNX artifact of the same model (edge-dlm export --target onnx)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--modes", nargs="+", default=list(MODES))
    a = p.parse_args()

    from edge_dlm.model import compiled
    from edge_dlm.runtime import load

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        cold = start_seconds(a.model, "on", env)
        warm = start_seconds(a.model, "on", env)
        eager_start = start_seconds(a.model, "off", env)
        os.environ["XDG_CACHE_HOME"] = cache
        from edge_dlm.model.store import compiled_cache

        runtimes = {"eager": load(a.model, device="cpu", compile="off")}
        fast = load(a.model, device="cpu", compile="off")
        compiled.enable(fast.model, compiled_cache())
        runtimes["compiled"] = fast
        if a.onnx:
            runtimes["onnxruntime"] = load(a.onnx, device="cpu")
        for rt in runtimes.values():  # warm-up: compiles every shape the runs use
            for mode in a.modes:
                rt.generate(PROMPT, mode=mode, max_new_tokens=a.tokens, block_size=4)
        from benchlib import interleaved

        got = interleaved({(name, mode): functools.partial(rt.generate, PROMPT, mode=mode, max_new_tokens=a.tokens,
                                                           block_size=4)
                           for mode in a.modes for name, rt in runtimes.items()}, a.rounds)
        speed = {key: [r.tokens_per_s for r in rs] for key, rs in got.items()}
    print(f"start-up, 16 tokens: eager {eager_start:.1f} s; compiled cold {cold:.1f} s, warm {warm:.1f} s "
          f"(warm - eager: {warm - eager_start:+.1f} s)\n")
    print("| mode (block 4) | " + " | ".join(f"{n} tok/s" for n in runtimes) + " | compiled / eager |"
          + (" compiled / onnxruntime |" if a.onnx else ""))
    print("|---" * (len(runtimes) + 2 + bool(a.onnx)) + "|")
    for mode in a.modes:
        med = {n: statistics.median(speed[n, mode]) for n in runtimes}
        row = f"| {mode} | " + " | ".join(f"{med[n]:.0f}" for n in runtimes) + f" | {med['compiled'] / med['eager']:.2f} |"
        if a.onnx:
            row += f" {med['compiled'] / med['onnxruntime']:.2f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
