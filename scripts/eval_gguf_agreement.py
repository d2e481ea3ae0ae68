"""Do llama.cpp and edge-dlm continue a prompt the same way on the same exported weights?

    .venv/bin/python scripts/eval_gguf_agreement.py [--model DIR] [--tokens 64]

For BF16, Q8_0 and Q4_0 GGUF exports of the model (default: the bundled demo model) against edge-dlm on
the bf16 checkpoint and its int8 / int4 at group size 32 (the block GGUF quantizes in): greedy
AR continuations of --tokens tokens from 10 prompts (EOS ignored on both sides), reporting per format
the share of prompts whose continuations are identical, the mean length of the common prefix and the
share of equal tokens position by position. Writes bench_results/gguf_agreement.json. Needs llama.cpp's
Python binding (make test installs it).

The Q8_0 / Q4_0 blocks hold edge-dlm's own int8 / int4 weights bit for bit (export.gguf.blocks), so
what differs is arithmetic: llama.cpp rounds activations to 8 bits (Q8_0 / Q4_0 dot products take a
Q8 activation) or bf16, edge-dlm multiplies float32 activations; on the tiny demo model a near-tie in
the logits flips a greedy pick and the continuations part there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def __init__(self):", "The quick brown fox",
           "for i in range(10):", "# compute the mean of a list\n", "def is_even(n):", "print(", "while True:",
           "Block diffusion language models"]
PROBE = ROOT / "tests" / "export" / "llama_cpp_probe.py"


def edge_dlm_greedy(model_dir: Path, prompts: list[list[int]], n: int, dtype: str, quant: str | None) -> list[list[int]]:
    import edge_dlm

    rt = edge_dlm.load(str(model_dir), dtype=dtype, engine="torch", quant=quant, group_size=32)
    return [rt.generate(ids, mode="ar", max_new_tokens=n, ignore_eos=True).output_ids for ids in prompts]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    prefix = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k)
    n = sum(min(len(x), len(y)) for x, y in zip(a, b))
    equal = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y))
    return {"identical": sum(x == y for x, y in zip(a, b)) / len(a), "mean_common_prefix": sum(prefix) / len(a),
            "equal_positions": equal / n if n else 1.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "edge_dlm" / "demo_model"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "gguf_agreement.json"))
    a = p.parse_args()
    from edge_dlm.primitives.tokenizer import Tokenizer

    src = Path(a.model)
    tok = Tokenizer.from_dir(src)
    prompts = [tok.encode(t) for t in PROMPTS]
    cli = str(ROOT / ".venv" / "bin" / "edge-dlm")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for fmt, gguf_args, quant in (("BF16", ["--dtype", "bfloat16"], None), ("Q8_0", ["--quant", "int8"], "int8"),
                                      ("Q4_0", ["--quant", "int4"], "int4")):
            g = d / f"{fmt}.gguf"
            subprocess.run([cli, "export", str(src), "-o", str(g), "--target", "gguf", *gguf_args], check=True,
                           capture_output=True)
            theirs = json.loads(subprocess.run([sys.executable, str(PROBE)], input=json.dumps(
                {"gguf": str(g), "greedy": prompts, "n": a.tokens}), capture_output=True, text=True,
                check=True).stdout)["greedy"]
            # the checkpoint's bf16 weights, exactly, in float32 passes (llama.cpp keeps activations in float32
            # too, rounding them to bf16 only at a BF16 matmul's input); and edge-dlm's own bf16 passes
            dtypes = ("float32", "bfloat16") if quant is None else ("float32",)
            for dt in dtypes:
                label = fmt if quant is not None else f"{fmt} vs edge-dlm {dt} passes"
                rows[label] = agreement(edge_dlm_greedy(src, prompts, a.tokens, dt, quant), theirs)
                print(label, rows[label], flush=True)
    from benchlib import record

    result = {"model": src.name, "tokens": a.tokens,
              "prompts": len(PROMPTS), "agreement": rows}
    record(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
