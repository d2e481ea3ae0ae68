"""The onnxruntime artifact with and without onnxruntime's transformer fusions (`export.onnx.fuse_graph`,
what optimum's ORTOptimizer would run): the demo model's tokens/s per mode through the onnxruntime
engine, both graphs in the same rounds, and whether they give the same tokens.

    .venv/bin/python scripts/bench_onnx_fusion.py [--tokens 200] [--rounds 3] [--threads 1] \
        [--out bench_results/onnx_fusion.json]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_results/onnx_fusion.json")
    a = p.parse_args()
    import torch

    import edge_dlm
    from benchlib import interleaved, record
    from edge_dlm.export.onnx import GRAPH_FILE, export_graph, export_onnx
    from edge_dlm.hub import DEMO_MODEL
    from edge_dlm.model.weights import load_model

    work = Path(tempfile.mkdtemp(prefix="edge-dlm-fusion-"))
    try:
        fused, plain = work / "fused", work / "plain"
        export_onnx(DEMO_MODEL, fused, log=lambda *_: None)
        shutil.copytree(fused, plain)
        export_graph(load_model(DEMO_MODEL, dtype=torch.float32, lora=True), plain / GRAPH_FILE, torch.float32)
        rts = {name: edge_dlm.load(str(d), engine="onnxruntime", threads=a.threads) for name, d in
               (("plain", plain), ("fused", fused))}
        rows = []
        for mode in MODES:
            got = interleaved({name: functools.partial(rt.generate, "Write a story about a cat", mode=mode,
                                                       max_new_tokens=a.tokens, ignore_eos=True)
                               for name, rt in rts.items()}, a.rounds)
            tps = {name: [r.tokens_per_s for r in rs] for name, rs in got.items()}
            ids = {name: rs[-1].output_ids for name, rs in got.items()}
            row = {"mode": mode, "plain_tok_s": round(statistics.median(tps["plain"]), 1),
                   "fused_tok_s": round(statistics.median(tps["fused"]), 1), "same_tokens": ids["plain"] == ids["fused"]}
            row["speedup"] = round(row["fused_tok_s"] / row["plain_tok_s"], 3)
            rows.append(row)
            print(row, flush=True)
        record(a.out, {"tokens": a.tokens, "rounds": a.rounds, "threads": a.threads, "rows": rows})
        print(f"wrote {a.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
