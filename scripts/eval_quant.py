"""Measure every quantization scheme on a checkpoint (default: the bundled demo model), on CPU.

Per scheme: weight bytes on disk (vs the bf16 checkpoint), load time, held-out AR perplexity and its
delta, greedy AR token agreement with the unquantized model, LinearSpec mean accepted length, and
tokens/s of AR and LinearSpec. Held-out text: the demo recipe's held-out stdlib files, tokenized with
the checkpoint's own tokenizer. Prints a markdown table (and JSON with --json).

    .venv/bin/python scripts/eval_quant.py [--model DIR] [--tokens 32768] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import edge_dlm  # noqa: E402
from edge_dlm.export.quantize import export_quantized  # noqa: E402
from edge_dlm.model.quant import QuantSpec  # noqa: E402
from edge_dlm.hub import DEMO_MODEL  # noqa: E402
from eval_demo import held_out_ppl, python_prompts  # noqa: E402
from train_demo import build_corpus, token_stream  # noqa: E402

SCHEMES = [("bf16 (source)", None, {}), ("bf16, bf16 activations", None, {"dtype": "bfloat16"}), ("int8 g64", "int8", {}), ("int4 g64", "int4", {}),
           ("int4 g32 asym", "int4", {"group_size": 32, "symmetric": False}),
           ("int4 g64, head bf16", "int4", {"head": False}),
           ("int4 g64 calibrated (awq)", "int4", {"calibration": "awq"}),
           ("int4 g64 calibrated, head bf16", "int4", {"calibration": "awq", "head": False}),
           ("int8 g64 calibrated (awq)", "int8", {"calibration": "awq"}), ("nf4 g64", "nf4", {}),
           ("llm-int8 (load-time)", "llm-int8", {})]


def held_out_tokens(rt, n: int) -> np.ndarray:
    cfg = json.loads((ROOT / "scripts" / "demo_recipe.json").read_text())
    _, test_docs, _ = build_corpus(cfg)
    return token_stream(rt.tokenizer, test_docs, [], 0.0, cfg["seed"])[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--tokens", type=int, default=32768, help="held-out tokens for perplexity")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    src = Path(a.model)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    base = edge_dlm.load(src, device="cpu")
    test = held_out_tokens(base, a.tokens)
    prompts = python_prompts(base.tokenizer, test, a.prompts)
    ref_out = [base.generate(p, mode="ar", max_new_tokens=a.max_new_tokens).output_ids for p in prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme, kw in SCHEMES:
            if scheme is None:
                t0 = time.perf_counter()
                rt, nbytes = edge_dlm.load(src, device="cpu", **kw), src_bytes
            elif scheme == "llm-int8":
                t0 = time.perf_counter()
                rt = edge_dlm.load(src, device="cpu", quant="llm-int8")
                nbytes = None  # not an artifact: bitsandbytes quantizes at load
            else:
                out = Path(tmp) / name.replace(" ", "_").replace(",", "")
                export_quantized(src, out, QuantSpec(scheme, **kw), log=lambda *_: None)
                nbytes = (out / "model.safetensors").stat().st_size
                t0 = time.perf_counter()
                rt = edge_dlm.load(out, device="cpu")
            load_s = time.perf_counter() - t0
            ppl = held_out_ppl(rt.model, test)
            agree, acc, ar_tps, ls_tps = [], [], [], []
            for p, ref in zip(prompts, ref_out):
                rt.generate(p, mode="ar", max_new_tokens=4)  # warm-up
                ar = rt.generate(p, mode="ar", max_new_tokens=a.max_new_tokens)
                ls = rt.generate(p, mode="linear-spec", max_new_tokens=a.max_new_tokens)
                # exact in fp32 activations; bf16 activations round differently at T = 1 and T = B
                assert ls.output_ids == ar.output_ids or kw.get("dtype"), "LinearSpec must equal AR"
                n = max(len(ref), len(ar.output_ids))
                agree.append(sum(x == y for x, y in zip(ref, ar.output_ids)) / n if n else 1.0)
                acc.append(ls.mean_accepted)
                ar_tps.append(ar.tokens_per_s)
                ls_tps.append(ls.tokens_per_s)
            rows.append({"scheme": name, "weight_bytes": nbytes, "vs_bf16": nbytes / src_bytes if nbytes else None,
                         "load_s": load_s, "ppl": ppl, "agreement": statistics.mean(agree),
                         "mean_accepted": statistics.mean(acc), "ar_tok_s": statistics.median(ar_tps),
                         "linear_spec_tok_s": statistics.median(ls_tps)})
            print(f"{name}: done", file=sys.stderr)
    base_ppl = rows[0]["ppl"]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{src.name}, {len(test)} held-out tokens, {a.prompts} prompts x {a.max_new_tokens} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| scheme | weight MB | vs bf16 | load s | held-out ppl | delta | AR agreement | LinearSpec accepted | AR tok/s | LinearSpec tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['weight_bytes'] / 1e6:.2f}" if r["weight_bytes"] else "n/a"
        ratio = f"{100 * r['vs_bf16']:.0f}%" if r["vs_bf16"] else "n/a"
        print(f"| {r['scheme']} | {mb} | {ratio} | {r['load_s']:.2f} | {r['ppl']:.2f} | {r['ppl'] - base_ppl:+.2f} | "
              f"{100 * r['agreement']:.1f}% | {r['mean_accepted']:.2f} | {r['ar_tok_s']:.0f} | {r['linear_spec_tok_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
