"""What the benchmark scripts share: one timing loop and one way to record a run.

    from benchlib import best_of, interleaved, record
    best = best_of({"a": f, "b": g}, rounds=8)          # seconds, the best round of each
    got = interleaved({"a": run_a, "b": run_b}, rounds=3, warmup=1)   # what each returned, round by round
    record("bench_results/x.json", {"rows": rows})      # + commit, machine, command, time

`interleaved` is the one timing loop every script uses: each round runs every function once, in the same
order, so a busy neighbour (a CI job, a test suite beside it) slows all of them alike and their ratios hold
within a run. `best_of` times functions with it and keeps the best round of each (what it costs when
nothing else interferes); scripts that report medians take the values it returns. `record` writes the result with what a
reader needs to trust a number (the commit and whether the tree was clean, the machine, the exact
command, the time) through a temporary file renamed into place; BENCHMARKS.md and the docs quote
numbers from these files (`tests/test_readme.py` checks that every number they quote is recorded).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]


def interleaved(fns: dict[str, Callable[[], T]], rounds: int, warmup: int = 0) -> dict[str, list[T]]:
    """The one timing loop: each round calls every function once, in the same order, and keeps what it
    returns (a measurement, a result); the first `warmup` rounds are run and dropped (compiles, caches).
    Returns each function's values, round by round."""
    out: dict[str, list[T]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, f in fns.items():
            value = f()
            if r >= warmup:
                out[name].append(value)
    return out


def seconds(f: Callable[[], object]) -> Callable[[], float]:
    """`f` as a function returning the seconds one call took (for `interleaved`)."""
    def timed() -> float:
        t = time.perf_counter()
        f()
        return time.perf_counter() - t
    return timed


def best_of(fns: dict[str, Callable[[], object]], rounds: int, per: int = 1) -> dict[str, float]:
    """The best of `rounds` interleaved rounds for each function, in seconds per call (`per`: calls the
    function makes of what is timed, e.g. weight copies, so the time is divided by it)."""
    got = interleaved({name: seconds(f) for name, f in fns.items()}, rounds)
    return {name: min(ts) / per for name, ts in got.items()}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    """The machine a number was measured on: CPU model, cores, memory, OS, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch_version = sys.modules["torch"].__version__ if "torch" in sys.modules else None
    return {"cpu": cpu, "arch": platform.machine(), "cpus": os.cpu_count(), "memory_gib": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch_version}


def _started() -> dict:
    """The commit the run measures: HEAD when this process started (a long run must not record a commit
    made while it ran; Linux: the process's start time, else now), and whether the tree was clean (known
    only while HEAD is still that commit; else None)."""
    now = _git("rev-parse", "--short", "HEAD")
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        start = None
    commit = (_git("log", "-1", "--format=%h", f"--before={int(start)}") if start else "") or now
    dirty = bool(_git("status", "--porcelain", "-uno")) if commit == now else None
    return {"commit": commit, "dirty": dirty}


def record(path: str | Path, result: dict) -> dict:
    """`result` with the run's provenance (the commit and whether the tree was clean when the script
    started, machine, command, UTC time), written to `path` as JSON (atomically); returns what was written."""
    out = {**_started(),
           "machine": machine(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    return out
