"""`edge-dlm calibrate`: measure every configuration again (progress bar), cache and print the table."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_model_args

    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.session.calibrate import calibrate, target
    from edge_dlm.session.load import bar, load_runtime

    rt = load_runtime(a)
    threads = measure_threads(rt) if a.threads is None and not os.environ.get("EDGE_DLM_THREADS") else None
    t = target(a)  # keyed by the threads just chosen
    table = calibrate(rt, t, progress=None if a.json else bar)
    compiled = measure_compile(rt) if a.compile != "off" else None
    if a.json:
        print(json.dumps({**table.to_json(), "threads": threads, "compiled_passes": compiled}, indent=2))
    else:
        if threads:
            speeds = ", ".join(f"{n}: {idle:.0f} / {busy:.0f}" for n, (idle, busy) in threads["tokens_per_s"].items())
            print(f"CPU threads for passes: {threads['threads']} (AR tok/s idle / beside one busy core: {speeds})")
        print(table.format())
        if compiled:
            verdict = "--compile auto compiles from now on" if compiled["faster"] else "--compile auto stays eager"
            e, c, start = compiled["eager_tokens_per_s"], compiled["compiled_tokens_per_s"], compiled["start_s"]
            if compiled["faster"] and start is not None:
                verdict += (f"; a new process loads them in {start:.2f} s, so a one-shot generate compiles from "
                            f"{start / (1 / e - 1 / c):.0f} tokens")
            print(f"compiled passes: AR {c:.0f} tok/s vs {e:.0f} eager; {verdict}")
    return 0


def measure_compile(rt, tokens: int = 128, runs: int = 3) -> dict | None:
    """Compile the torch engine's AR passes ahead (kept in the model's store, `compiled_store`) and
    measure them against eager, and what a new compiled process adds before its first compiled pass
    (`store.measure_start`); `--compile auto` compiles from then on where they were faster (a
    one-shot `generate` only where its tokens pay back that start). Returns the measurement (None where
    compiled passes do not apply: another engine, the Triton kernels)."""
    import statistics
    import sys

    from edge_dlm.model import compiled
    from edge_dlm.model import store
    from edge_dlm.model.store import compiled_cache, compiled_key, compiled_store

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
    compiled.enable(rt.model, compiled_cache(), store=compiled_store(rt))  # kept for every later process
    fast = speed()
    step = rt.model.step
    kept = [step._path(k) for k in step.fns if step._path(k).is_file()]
    start = store.measure_start(kept) if kept else None
    if not was:
        compiled.disable(rt.model)
    store.record(compiled_cache(), compiled_key(rt), eager, fast, start)
    return {"eager_tokens_per_s": eager, "compiled_tokens_per_s": fast, "faster": fast > eager, "start_s": start}


def measure_threads(rt, tokens: int = 32) -> dict | None:
    """Choose the CPU threads passes use on this machine: AR on the torch CPU engine at 1, half,
    all-but-one and all usable CPUs, each idle and again beside one busy core (a stand-in for the chat
    screen, a terminal or a browser: torch's parallel regions collapse when a thread of theirs is
    descheduled), keeping the count with the best worst case (`record_threads`; `threads_for` uses it
    from now on). None where it does not apply (a GPU, an exported engine, one CPU)."""
    import statistics
    import subprocess
    import sys

    import torch

    from edge_dlm.primitives.machine import record_threads, set_threads, usable_cpus

    n = usable_cpus()
    if rt.device.type != "cpu" or rt.engine != "torch" or n < 2:
        return None
    candidates = sorted({1, max(1, n // 2), n - 1, n})
    prompt = "Write a short story about a lighthouse keeper"

    def speed() -> float:
        rt.generate(prompt, mode="ar", max_new_tokens=4)  # warm-up at this thread count
        return statistics.median(rt.generate(prompt, mode="ar", max_new_tokens=tokens).tokens_per_s for _ in range(2))

    print(f"measuring CPU threads ({', '.join(map(str, candidates))}) ...", file=sys.stderr, flush=True)
    got: dict[int, list[float]] = {}
    for c in candidates:
        torch.set_num_threads(c)
        got[c] = [speed()]
    try:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # no second interpreter to run: the idle numbers decide
        busy = None
    try:
        for c in candidates:
            if busy is not None:
                torch.set_num_threads(c)
                got[c].append(speed())
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    best = max(candidates, key=lambda c: (min(got[c]), -c))
    record_threads(best, got)
    set_threads(best)
    return {"threads": best, "tokens_per_s": got}
