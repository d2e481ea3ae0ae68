#!/usr/bin/env python3
"""Measure a trained demo model on the held-out split and write its model card (README.md).

    .venv/bin/python scripts/eval_demo.py --model runs/demo_model --work runs/demo

Numbers: AR perplexity on held-out tokens; per mode, TPF, tokens/s (CPU, this machine) and mean
accepted length on held-out Python prompts; diffusion quality against AR at step budgets 2, 4, 8
(token agreement with the AR continuation, and the model's own AR perplexity of what it wrote).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edge_dlm  # noqa: E402

CHAT_PROMPTS = ["Write a Python function is_even(n). Return True if n is even.",
                "What is the Python module json for?",
                "Write a Python function read_lines(path). Return the lines of a text file."]


def held_out_ppl(model, tokens: np.ndarray, window: int = 256) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(tokens) - window - 1, window):
            x = torch.from_numpy(tokens[s:s + window + 1].astype(np.int64))[None]
            logits = model(x[:, :-1], torch.arange(window)[None])
            nll += torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
            count += window
    return math.exp(nll / count)


def python_prompts(tok, tokens: np.ndarray, n: int, length: int = 48) -> list[list[int]]:
    """Held-out prompts starting at the beginning of a line."""
    nl = [i for i, t in enumerate(tokens[:-length]) if "\n" in (tok.decode([int(t)]) or "")]
    step = max(1, len(nl) // n)
    return [[1] + tokens[nl[i] + 1:nl[i] + 1 + length].astype(int).tolist() for i in range(0, step * n, step)]


def self_ppl(model, prompt: list[int], output: list[int]) -> float:
    if not output:
        return float("nan")
    x = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = model(x[:, :-1], torch.arange(x.shape[1] - 1)[None])[0, len(prompt) - 1:]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), x[0, len(prompt):]).item())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    rt = edge_dlm.load(a.model, device="cpu")
    work = Path(a.work)
    test = np.load(work / "test_tokens.npy")
    info = json.loads((work / "train_info.json").read_text())
    out: dict = {"train": info, "held_out_ar_ppl": round(held_out_ppl(rt.model, test), 2)}
    prompts = python_prompts(rt.tokenizer, test, a.prompts)
    configs = [("ar", {}), ("linear-spec", {}), ("quadratic-spec", {}),
               ("diffusion", {"steps": 8}), ("diffusion", {"steps": 4}), ("diffusion", {"steps": 2})]
    rt.generate(prompts[0], mode="ar", max_new_tokens=8)  # warm-up
    ar_outputs = []
    rows = []
    for mode, extra in configs:
        tpf, tps, acc, agree, sppl = [], [], [], [], []
        for i, p in enumerate(prompts):
            r = rt.generate(p, mode=mode, max_new_tokens=a.max_new_tokens, **extra)
            tpf.append(r.tpf)
            tps.append(r.tokens_per_s)
            if r.mean_accepted is not None:
                acc.append(r.mean_accepted)
            if mode == "ar":
                ar_outputs.append(r.output_ids)
            else:
                ref = ar_outputs[i]
                n = max(len(ref), len(r.output_ids), 1)
                agree.append(sum(x == y for x, y in zip(ref, r.output_ids)) / n)
            sppl.append(self_ppl(rt.model, p, r.output_ids))
        rows.append({"mode": mode + (f" S={extra['steps']}" if extra else ""),
                     "tpf": round(statistics.mean(tpf), 2), "tokens_per_s": round(statistics.median(tps), 1),
                     "mean_accepted": round(statistics.mean(acc), 2) if acc else None,
                     "agreement_with_ar": round(statistics.mean(agree), 3) if agree else 1.0,
                     "self_ppl": round(statistics.median(sppl), 2)})
        print(rows[-1], flush=True)
    out["modes"] = rows
    samples = {}
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        samples[mode] = [rt.generate(q, mode=mode, max_new_tokens=80, steps=4 if mode == "diffusion" else None).text
                         for q in CHAT_PROMPTS]
    out["samples"] = samples
    out["machine"] = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
    out["date"] = time.strftime("%Y-%m-%d")
    (work / "eval.json").write_text(json.dumps(out, indent=2))
    (Path(a.model) / "README.md").write_text(model_card(rt, out), encoding="utf-8")
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))
    return 0


def model_card(rt, out: dict) -> str:
    cfg = rt.config
    info = out["train"]
    table = "\n".join(
        f"| {r['mode']} | {r['tpf']} | {r['tokens_per_s']} | {r['mean_accepted'] if r['mean_accepted'] is not None else '-'} "
        f"| {r['agreement_with_ar']} | {r['self_ppl']} |" for r in out["modes"])
    samples = "\n".join(f"- **{m}**: `{json.dumps(s[0][:160])}`" for m, s in out["samples"].items())
    return f"""# edge-dlm demo model (NLD format)

A {info['params'] / 1e6:.1f}M-parameter Nemotron-Labs-Diffusion-architecture model (Ministral-3 layers, GQA,
YaRN RoPE, untied `diffusion_head`), trained from scratch by `scripts/train_demo.py` with the NLD joint
AR + masked-diffusion objective, so one checkpoint decodes in every mode. It exists so edge-dlm works
out of the box with no network; it is a toy: expect Python-flavoured text, not answers.

- Shape: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size},
  {cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads of {cfg.head_dim}, vocab {cfg.vocab_size}
  (byte-level BPE), block size {cfg.block_size}, mask id {cfg.mask_token_id}, eos id {cfg.eos_token_id}.
- Data: the CPython {sys.version.split()[0]} standard library source (tests excluded), {info['train_tokens']:,}
  training tokens, about a third of them instruction pairs in the chat template (function signature +
  docstring -> function; module name -> module docstring). Held out: every 50th file by path hash,
  {info['held_out_tokens']:,} tokens.
- Training: {info['steps']} steps of {info.get('batch', 16)} x {info.get('seq_len', 256)} tokens ({info['tokens_seen']:,} tokens seen), AdamW, lr 3e-3,
  cosine decay, w_dlm 0.3 / w_ar 1.0, {info['train_minutes']} minutes on a 2-core CPU (no GPU was available;
  a longer GPU run is owed). Weights stored in bfloat16.

## Measured on the held-out split ({out['machine']}, {out['date']})

Held-out AR perplexity: **{out['held_out_ar_ppl']}**.

Greedy, {len(out['modes'])} configurations x held-out Python prompts (48 prompt tokens, 64 new tokens),
fp32 on CPU. Agreement = fraction of positions equal to AR's continuation; self-ppl = the model's own
AR perplexity of what the mode wrote (lower is more fluent).

| mode | TPF | tokens/s | mean accepted | agreement with AR | self-ppl |
|---|---|---|---|---|---|
{table}

Reproduce: `.venv/bin/python scripts/train_demo.py --out edge_dlm/demo_model` then
`.venv/bin/python scripts/eval_demo.py --model edge_dlm/demo_model --work runs/demo`.

## Samples (chat template, greedy)

{samples}
"""


if __name__ == "__main__":
    sys.exit(main())
