"""Compiled passes in a new process: what a one-shot command and a starting server get from the store.

    .venv/bin/python scripts/bench_compiled_start.py [--model DIR] [--tokens 128 1000] [--rounds 3]
        [--threads 1] [--out bench_results/compiled_start.json]

Every number is a new process as a user starts it, in a private cache folder (the user's is not
touched), rounds interleaved, medians reported:

- `edge-dlm generate --mode ar --ignore-eos` with `--compile off`, `--compile on` with an empty store
  (cold), and `--compile on` once an earlier process compiled the shapes (warm): wall clock from start
  to exit, the command's own elapsed and first-token times;
- a server-like process (the Python API, as `serve` and the chat load a model): load, let the background
  worker read the store ahead (`StepFunctions.read`), then the first token and the whole answer;
- `--compile auto` once `edge-dlm calibrate`'s measurement (`measure_compile`) is recorded: a one-shot
  command compiles only where its tokens pay back the start (`store.measured_faster`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edge_dlm.cli"]
PROMPT = "Write a story about a lighthouse keeper"


def one_shot(env: dict, model: str | None, tokens: int, threads: int, compile_: str) -> dict:
    cmd = [*CLI, "generate", "--prompt", PROMPT, "--mode", "ar", "--max-new-tokens", str(tokens), "--ignore-eos",
           "--threads", str(threads), "--json", "--compile", compile_]
    if model:
        cmd += ["--model", model]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    r = json.loads(out.stdout)
    return {"wall_s": wall, "elapsed_s": r["elapsed_s"], "ttft_s": r["ttft_s"], "ids": r["output_ids"]}


SERVER = """
import json, sys, time
t0 = time.perf_counter()
from edge_dlm.runtime import load
rt = load({model!r}, device="cpu", compile="on", threads={threads})
loaded = time.perf_counter()
rt.model.step.wait()  # the worker reads the store ahead while the server waits for its first request
ready = time.perf_counter()
r = rt.generate({prompt!r}, mode="ar", max_new_tokens={tokens}, ignore_eos=True)
print(json.dumps({{"load_s": loaded - t0, "read_ahead_s": ready - loaded, "ttft_s": r.ttft_s,
                  "elapsed_s": r.elapsed_s, "loaded": rt.model.step.loaded, "ids": r.output_ids}}))
"""

WARM = """
from edge_dlm.runtime import load
rt = load({model!r}, device="cpu", compile="on", threads={threads})
for n in {tokens!r}:
    rt.generate({prompt!r}, mode="ar", max_new_tokens=n, ignore_eos=True)
rt.model.step.wait()  # compiled between requests, kept in the store
print(rt.model.step.summary())
"""

CALIBRATE = """
import json
from edge_dlm.cli.calibrate import measure_compile
from edge_dlm.runtime import load
print(json.dumps(measure_compile(load({model!r}, device="cpu", compile="off", threads={threads}))))
"""


def python(env: dict, code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"a measuring process failed: {out.stderr.strip()[-800:]}")
    return out.stdout.strip().splitlines()[-1]


def med(runs: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled demo model)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "compiled_start.json")
    a = ap.parse_args()
    from benchlib import interleaved

    cache = Path(tempfile.mkdtemp(prefix="edge-dlm-start-"))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    fmt = dict(model=a.model, threads=a.threads, prompt=PROMPT)
    report: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": a.threads, "model": a.model or "demo", "tokens": {}}

    one_shot(env, a.model, 8, a.threads, "off")  # the CPU kernels build into the new cache folder first
    cold = {n: one_shot(env, a.model, n, a.threads, "on") for n in a.tokens}  # empty store: runs eagerly
    t = time.perf_counter()
    summary = python(env, WARM.format(tokens=a.tokens, **fmt))
    report["warm_up"] = {"seconds": time.perf_counter() - t, "summary": summary}
    calib = json.loads(python(env, CALIBRATE.format(**fmt)))
    report["calibration"] = calib
    for n in a.tokens:
        fns = {how: functools.partial(one_shot, env, a.model, n, a.threads, how) for how in ("off", "on", "auto")}
        fns["server"] = lambda: json.loads(python(env, SERVER.format(tokens=n, **fmt)))  # noqa: B023 (used now)
        runs = interleaved(fns, a.rounds)
        same = all(r["ids"] == runs["off"][0]["ids"] for rs in runs.values() for r in rs) and \
            cold[n]["ids"] == runs["off"][0]["ids"]
        row = {how: {f: med(rs, f) for f in ("wall_s", "elapsed_s", "ttft_s")} for how, rs in runs.items()
               if how != "server"}
        row["cold_on"] = {f: cold[n][f] for f in ("wall_s", "elapsed_s", "ttft_s")}
        row["server"] = {f: med(runs["server"], f) for f in ("load_s", "read_ahead_s", "ttft_s", "elapsed_s")}
        row["server"]["loaded"] = runs["server"][0]["loaded"]
        row["same_tokens"] = same
        report["tokens"][n] = row
        off = row["off"]
        print(f"{n} tokens (same tokens everywhere: {same}):")
        for how in ("off", "cold_on", "on", "auto"):
            r = row[how]
            print(f"  generate --compile {how:<8} wall {r['wall_s']:.2f} s ({off['wall_s'] / r['wall_s']:.2f}x eager), "
                  f"answer {r['elapsed_s']:.2f} s ({off['elapsed_s'] / r['elapsed_s']:.2f}x), first token {r['ttft_s']:.3f} s")
        s = row["server"]
        print(f"  server-like: load {s['load_s']:.2f} s, store read ahead {s['read_ahead_s']:.2f} s ({s['loaded']} shapes), "
              f"first token {s['ttft_s']:.3f} s, answer {s['elapsed_s']:.2f} s ({off['elapsed_s'] / s['elapsed_s']:.2f}x eager)")
    e, c, st = calib["eager_tokens_per_s"], calib["compiled_tokens_per_s"], calib["start_s"]
    if c > e and st is not None:
        print(f"calibration: AR {c:.0f} vs {e:.0f} tok/s eager, start {st:.2f} s: a one-shot compiles from "
              f"{st / (1 / e - 1 / c):.0f} tokens")
    from benchlib import record

    record(a.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
