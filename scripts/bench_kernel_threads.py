"""Whose threads the CPU kernels run on, timed: torch's (ATen's parallel_for, what the C++ operators
install) against the kernels' own threads started per call (the path of an install without the operators)
and one thread, at the NLD-3B up projection (9216 x 3072), int8 / int4 / bf16, 1 / 4 / 16 rows.

    .venv/bin/python scripts/bench_kernel_threads.py --threads 2 --out bench_results/kernel_threads.json

`--against LIB`: also a kernels library built elsewhere (same entry points, e.g. an older source built
with `cc -O3 -march=native -shared -fPIC -Ikernels/csrc kernels/csrc/*.c -lm`), called the same way (ctypes)."""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--against", help="another kernels library (.so) to time beside this one")
    p.add_argument("--out", help="record the table as JSON (benchlib.record)")
    a = p.parse_args()
    import torch

    from benchlib import best_of, record
    from edge_dlm.kernels import cpu_build, cpu_matmul
    from edge_dlm.model.quant import QuantLinear, QuantSpec

    lib = cpu_build.library()
    aten = cpu_build._BOUND.cpp.edge_dlm_parallel() if cpu_build.cpp_operators() else None
    if not aten:
        print("needs the C++ operators built with torch's threading (edge-dlm doctor says)", file=sys.stderr)
        return 2
    other = None
    if a.against:
        other = ctypes.CDLL(a.against)
        for name, args in (("x16_gemm", [ctypes.c_int, *[ctypes.c_void_p], ctypes.c_int64, ctypes.c_int64,
                                         *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_int]),
                           ("bf16_gemm", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])):
            getattr(other, name).argtypes, getattr(other, name).restype = args, ctypes.c_int
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    n, k = 9216, 3072
    rows_out = []
    for kind in ("int8", "int4", "bf16"):
        if kind == "bf16":
            if not lib.bf16_simd():
                continue
            wb = torch.randn(n, k).bfloat16()
        else:
            w, s, z = cpu_matmul.x16_layout(QuantLinear.from_weight(0.05 * torch.randn(n, k),
                                                                   QuantSpec(kind, group_size=32)))
        for rows in (1, 4, 16):
            x = torch.randn(rows, k)
            xb, y = x.bfloat16(), torch.empty(rows, n)

            def call(kernels, threads, parallel=None, set_parallel=True):
                def f():
                    if set_parallel:
                        kernels.edge_set_parallel(parallel)
                    if kind == "bf16":
                        kernels.bf16_gemm(xb.data_ptr(), rows, k, wb.data_ptr(), n, y.data_ptr(), threads)
                    else:
                        kernels.x16_gemm(8 if kind == "int8" else 4, x.data_ptr(), rows, k, w.data_ptr(),
                                         s.data_ptr(), None, n, 32, y.data_ptr(), threads)
                return f
            fns = {"torch's threads": call(lib, a.threads, aten), "own threads": call(lib, a.threads),
                   "one thread": call(lib, 1)}
            if other is not None:
                fns["--against"] = call(other, a.threads, set_parallel=False)
            best = best_of(fns, a.rounds)
            lib.edge_set_parallel(aten)
            row = {"kind": kind, "rows": rows, **{name: round(t * 1e3, 4) for name, t in best.items()}}
            rows_out.append(row)
            print(f"{kind} {rows:>2} rows: " + ", ".join(f"{name} {t * 1e3:.3f} ms" for name, t in best.items()))
    if a.out:
        record(a.out, {"shape": [n, k], "threads": a.threads, "ms": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
