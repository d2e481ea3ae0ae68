"""What loading a model costs a user on the CPU: seconds to load, seconds to a first short answer, and
the process's resident and peak memory after it (Linux: /proc/self/status, ru_maxrss).

    .venv/bin/python scripts/bench_load_memory.py CHECKPOINT [--quant int4|int8] [--dtype auto|float32|bfloat16]

Run it once per configuration (a fresh process each: peak memory is per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def resident_mib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--quant")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    from edge_dlm.model.quant import weight_bytes
    from edge_dlm.runtime import load

    t0 = time.perf_counter()
    rt = load(a.checkpoint, device="cpu", dtype=a.dtype, quant=a.quant, group_size=32, compile="off", lora=False,
              threads=a.threads)
    t1 = time.perf_counter()
    rt.generate("Write a story about a cat", mode="ar", max_new_tokens=2)
    t2 = time.perf_counter()
    print(json.dumps({"checkpoint": a.checkpoint, "quant": a.quant, "dtype": str(rt.dtype),
                      "load_s": round(t1 - t0, 2), "first_answer_s": round(t2 - t1, 2),
                      "resident_mib": resident_mib(),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "weight_mib": weight_bytes(rt.model) // 2**20}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
