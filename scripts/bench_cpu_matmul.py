"""The CPU matmul kernels per pass width: int8 / int4 (`x16_gemm`, and the wide route `dequant_mm`) and
bf16 (`bf16_gemm` up to 32 rows, torch's GEMM past that), milliseconds per call, interleaved (each
round times every kernel once, so a busy neighbour slows all alike), best of `--rounds`.

    .venv/bin/python scripts/bench_cpu_matmul.py [--shape 9216 3072] [--group 32] [--threads 1]

`--shape N K`: the weight's output and input features (default: NLD-3B's up projection). GB/s counts
the bytes a 1-row pass must read (weights and fp16 scales).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[9216, 3072], metavar=("N", "K"))
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args()

    from edge_dlm.kernels import cpu_matmul as c
    from edge_dlm.model.quant import QuantLinear, QuantSpec

    if not c.usable():
        sys.exit("the CPU kernels cannot be built here (edge-dlm doctor says why)")
    torch.set_num_threads(a.threads)
    n, k = a.shape
    w = 0.05 * torch.randn(n, k)
    mods = {s: QuantLinear.from_weight(w, QuantSpec(s, group_size=a.group)) for s in ("int8", "int4")}
    for m in mods.values():
        c.cpu_quant_matmul.prepare(m)
    wb = w.bfloat16()
    bytes_1row = {"int8": n * k * 1.0625, "int4": n * k * 0.5625, "bf16": n * k * 2}
    print(f"weight {n} x {k}, groups of {a.group}, {a.threads} thread(s); ms per call (best of {a.rounds})\n")
    print("| rows | int8 x16 | int8 wide | int4 x16 | int4 wide | bf16 |\n|---|---|---|---|---|---|")
    for rows in a.rows:
        x = torch.randn(rows, k)
        xb = x.bfloat16()
        fs = {}
        for s, m in mods.items():
            lay = m.derived("cpu-x16", c.x16_layout)
            fs[f"{s} x16"] = lambda m=m, lay=lay: c.x16_gemm(x, *lay, m.spec.bits, a.group, n)
            fs[f"{s} wide"] = lambda m=m: c.dequant_mm(x, m.qweight, m.scales, m.zeros, m.spec.bits, a.group)
        fs["bf16"] = (lambda: c.bf16_gemm(xb, wb)) if rows <= c.MAX_ROWS else (lambda: torch.nn.functional.linear(xb, wb))
        best = {name: float("inf") for name in fs}
        for _ in range(a.rounds):
            for name, f in fs.items():
                t = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t)
        cells = []
        for name in ("int8 x16", "int8 wide", "int4 x16", "int4 wide", "bf16"):
            ms = best[name] * 1e3
            gbs = f" ({bytes_1row[name.split()[0]] / best[name] / 1e9:.0f} GB/s)" if rows == 1 else ""
            cells.append(f"{ms:.2f}{gbs}")
        print(f"| {rows} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
