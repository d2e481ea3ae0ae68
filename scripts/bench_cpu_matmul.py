"""The CPU matmul kernels per pass width: int8 / int4 (`x16_gemm`) and bf16 (`bf16_gemm` up to 32 rows,
torch's GEMM past that) against torch's bf16 GEMM at every width, milliseconds per call, interleaved
(each round times every kernel once, so a busy neighbour slows all alike), best of `--rounds`.

    .venv/bin/python scripts/bench_cpu_matmul.py [--shape 9216 3072] [--group 32] [--threads 1]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_cpu_matmul.py --variant avx2
    .venv/bin/python scripts/bench_cpu_matmul.py --against native   # the installed variant vs -march=native

`--shape N K`: the weight's output and input features (default: NLD-3B's up projection); each call
reads the next of enough copies to exceed the CPU's caches, as a model's layers do. GB/s counts the
bytes a 1-row pass must read (weights and fp16 scales). `--variant X`: a variant built with the package
that this CPU can run (`avx-vnni`: the 256-bit path of Intel laptops; `avx2`; `native`: built here with
-march=native); with the two variables above torch's own kernels stop at AVX2 too, so both sides are
what such a laptop runs. `--against Y`: a second build timed in the same rounds (a variant's name, `native`, or a
library's path, e.g. an older source's build; an A/B: each kernel's column gets a `Y / X` ratio, > 1: X
faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[9216, 3072], metavar=("N", "K"))
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--variant", help="the kernels' build (default: the one this process picks)")
    p.add_argument("--against", help="a second build timed in the same rounds (A/B)")
    p.add_argument("--out", help="also record the table as JSON (benchlib.record)")
    p.add_argument("--copies-mib", type=int, default=96, help="weight copies to cycle through, MiB of int4 at least")
    a = p.parse_args()

    from benchlib import best_of, record

    from edge_dlm.kernels import cpu_build as cb
    from edge_dlm.kernels import cpu_matmul as c
    from edge_dlm.model.quant import QuantLinear, QuantSpec

    if not cb.usable():
        sys.exit("the CPU kernels cannot be built here (edge-dlm doctor says why)")
    cb.library()  # registers the operators; `bind` points them at a build
    builds = {}
    for name in filter(None, [a.variant or cb.variant()[0], a.against]):
        if name == "native":
            builds[name] = cb.build(cb.cache_root_kernels() / f"cpu_matmul-{cb._cpu_key()}.so")
        elif name.endswith(".so"):  # a library built elsewhere, e.g. of an older source
            builds[name] = cb.load(Path(name))
        else:
            builds[name] = cb.load(cb.LIB / f"cpu_kernels-{name}.so")
    label = list(builds)[0]
    cb.bind(builds[label])
    torch.set_num_threads(a.threads)
    n, k = a.shape
    copies = max(1, -(-(a.copies_mib << 20) // (n * k // 2)))
    w = [0.05 * torch.randn(n, k) for _ in range(copies)]
    mods = {s: [c.x16_layout(QuantLinear.from_weight(t, QuantSpec(s, group_size=a.group))) for t in w]
            for s in ("int8", "int4")}
    # on 2 MiB pages where the kernel offers them, as a loaded model's bf16 weights are (`enable_bf16`)
    wb = [c._huge_pages(t.numel() * 2).view(torch.bfloat16).view(t.shape).copy_(t) for t in w]
    bytes_1row = {"int8": n * k * 1.0625, "int4": n * k * 0.5625, "bf16": n * k * 2, "torch": n * k * 2}
    widths = cb.simd()
    print(f"weight {n} x {k} ({copies} copies), groups of {a.group}, {a.threads} thread(s), kernels built for "
          f"{' vs '.join(builds)} (int8 / int4 {widths['int8 / int4']}-bit, bf16 {widths['bf16']}-bit); "
          f"ms per call (best of {a.rounds})\n")
    kernels = ("int8 x16", "int4 x16", "bf16 kernel")
    other = [f"{k} {a.against}/{label}" for k in kernels] if a.against else []
    names = [*kernels, "torch bf16 GEMM"]
    print("| rows | " + " | ".join(names + other) + " |\n" + "|---" * (1 + len(names + other)) + "|")
    table = []
    for rows in a.rows:
        x = torch.randn(rows, k)
        xb = x.bfloat16()
        fs = {}
        for s, lays in mods.items():
            bits = 8 if s == "int8" else 4
            fs[f"{s} x16"] = lambda lays=lays, bits=bits: [c.x16_gemm(x, *lay, bits, a.group, n) for lay in lays]
        if widths["bf16"] and rows <= c.max_rows():
            fs["bf16 kernel"] = lambda: [c.bf16_gemm(xb, t) for t in wb]
        fs["torch bf16 GEMM"] = lambda: [torch.nn.functional.linear(xb, t) for t in wb]
        timed = {}
        for name, f in fs.items():
            for b, lib in builds.items():
                if b == label or name in kernels:
                    timed[name, b] = lambda f=f, lib=lib: (cb.bind(lib), f())
        best = best_of(timed, a.rounds, per=copies)
        cb.bind(builds[label])
        cells = []
        for name in names:
            if (name, label) not in best:
                cells.append("-")
                continue
            ms = best[name, label] * 1e3
            gbs = f" ({bytes_1row[name.split()[0]] / best[name, label] / 1e9:.0f} GB/s)" if rows == 1 else ""
            cells.append(f"{ms:.2f}{gbs}")
        for name in kernels if a.against else ():
            cells.append(f"{best[name, a.against] / best[name, label]:.3f}" if (name, label) in best else "-")
        print(f"| {rows} | " + " | ".join(cells) + " |")
        table.append({"rows": rows, "ms": {f"{name} [{b}]": round(t * 1e3, 4) for (name, b), t in best.items()}})
    if a.out:
        record(a.out, {"shape": [n, k], "group": a.group, "threads": a.threads, "builds": list(builds),
                       "simd": widths, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
