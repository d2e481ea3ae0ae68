"""`edge-dlm calibrate`: measure every configuration again (progress bar), cache and print the table."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_model_args

    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.session.calibrate import calibrate, target
    from edge_dlm.session.load import bar, load_runtime

    t = target(a)
    rt = load_runtime(a)
    table = calibrate(rt, t, progress=None if a.json else bar)
    compiled = measure_compile(rt) if a.compile != "off" else None
    if a.json:
        print(json.dumps({**table.to_json(), "compiled_passes": compiled}, indent=2))
    else:
        print(table.format())
        if compiled:
            verdict = "--compile auto compiles from now on" if compiled["faster"] else "--compile auto stays eager"
            print(f"compiled passes: AR {compiled['compiled_tokens_per_s']:.0f} tok/s vs "
                  f"{compiled['eager_tokens_per_s']:.0f} eager; {verdict}")
    return 0


def measure_compile(rt, tokens: int = 128, runs: int = 3) -> dict | None:
    """Compile the torch engine's AR passes ahead (the kernels stay in the cache) and measure them
    against eager; `--compile auto` compiles from then on where they were faster. Returns the
    measurement (None where compiled passes do not apply: another engine, the Triton kernels)."""
    import statistics
    import sys

    from edge_dlm.model import compiled
    from edge_dlm.runtime import compiled_cache, compiled_key

    if rt.engine != "torch" or rt.kernels or compiled.available(rt.device):
        return None
    was = rt.model.compiled
    prompt = "Write a short story about a lighthouse keeper"

    def speed() -> float:
        rt.generate(prompt, mode="ar", max_new_tokens=tokens)  # warm-up (compiles when compiled)
        return statistics.median(rt.generate(prompt, mode="ar", max_new_tokens=tokens).tokens_per_s
                                 for _ in range(runs))

    print("compiling the AR passes (once per machine) ...", file=sys.stderr, flush=True)
    compiled.disable(rt.model)
    eager = speed()
    compiled.enable(rt.model, compiled_cache())
    fast = speed()
    if not was:
        compiled.disable(rt.model)
    compiled.record(compiled_cache(), compiled_key(rt), eager, fast)
    return {"eager_tokens_per_s": eager, "compiled_tokens_per_s": fast, "faster": fast > eager}
