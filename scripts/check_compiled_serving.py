"""Compiled passes as a server uses them, on any device: requests on new threads that switch mode,
block size, steps and sampling every time, answered by a `--compile on` runtime and an eager one; every
answer must be the eager one's, before and after the background compiles finish; constrained output
(a JSON schema) in every mode too. Prints one line per phase and exits 1 on a mismatch.

    .venv/bin/python scripts/check_compiled_serving.py --device cuda --requests 60

(In `scripts/gpu_report.sh`: CUDA graphs under the same load as the CPU test `tests/test_compiled_serving.py`.)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def in_thread(fn, *args, **kw):
    out = {}
    t = threading.Thread(target=lambda: out.update(v=fn(*args, **kw)))
    t.start()
    t.join()
    return out.get("v")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=60)
    a = p.parse_args()
    import edge_dlm
    from test_compiled_serving import turns

    eager = edge_dlm.load(device=a.device, compile="off")
    fast = edge_dlm.load(device=a.device, compile="on")
    prompts = ["hello there", "def parse(config):", "Write a short story about a lighthouse keeper. " * 8]
    reqs = [(prompts[i % 3], kw) for i, kw in enumerate(turns(3, a.requests))]
    t0 = time.perf_counter()
    want = [eager.generate(pr, **kw).output_ids for pr, kw in reqs]
    t_eager = time.perf_counter() - t0
    bad = 0
    for phase in ("while compiling", "compiled"):
        t0 = time.perf_counter()
        got = [in_thread(fast.generate, pr, **kw) for pr, kw in reqs]
        dt = time.perf_counter() - t0
        miss = [i for i, (g, w) in enumerate(zip(got, want)) if g is None or g.output_ids != w]
        bad += len(miss)
        print(f"{phase}: {len(reqs) - len(miss)}/{len(reqs)} equal to eager, {dt:.1f} s (eager {t_eager:.1f} s); "
              f"{fast.model.step.summary()}", flush=True)
        if phase == "while compiling":
            t0 = time.perf_counter()
            fast.model.step.wait()
            print(f"background compiles finished in {time.perf_counter() - t0:.1f} s", flush=True)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["name", "n"], "additionalProperties": False}
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        r = in_thread(fast.generate, "a thing as JSON", mode=mode, json_schema=schema, max_new_tokens=60)
        ok = r is not None and r.finish_reason == "stop"
        bad += not ok
        print(f"json schema, {mode}: {'ok' if ok else 'FAILED'} {r.text if r else ''}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
