"""edge-dlm against llama.cpp on the same weights, on the CPU: decode, prefill and pass widths, one table.

    .venv/bin/pip install -e '.[llamacpp]'      # llama.cpp through llama-cpp-python (builds: minutes)
    .venv/bin/python scripts/bench_llamacpp.py --shape 3b --layers 4 --threads 1 2
    .venv/bin/python scripts/bench_llamacpp.py --model edge_dlm/demo_model --threads 1 2

The weights: `--model DIR` (a checkpoint), or `--shape 3b|8b` with `--layers N`: random weights at the
real NLD layer shape (vocabulary 131072) written as a checkpoint first. Each precision is exported with
`edge-dlm export --target gguf` (BF16, Q8_0, Q4_0) and loaded by llama.cpp; edge-dlm loads the same
checkpoint in the matching precision (bfloat16; `--quant int8` / `int4` with groups of 32, the blocks
Q8_0 / Q4_0 use), eagerly and compiled (`--compile on`; float32 activations, and for BF16 the bf16
weights, plus float32 copies when they are small enough to fit beside the others in memory).

Measured per thread count, interleaved (each round times every engine once, so a busy neighbour slows
all alike), median of `--rounds`:
- decode: tokens/s of one-token causal passes after a 64-token context (the AR step; logits computed
  for the token in both engines, no sampling);
- prefill: tokens/s of one causal pass over `--prefill` tokens from an empty cache;
- pass widths: the cost of a 16-token pass over the context relative to a 1-token one, with the logits of
  all 16 rows (what a verify or denoising pass needs, and what makes self-speculation pay: edge-dlm's
  block pass; llama.cpp's batch with `logits_all`) and with the last row's only (a prefill chunk; what
  llama.cpp's batch computes by default).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_checkpoint(shape: str, layers: int, out: Path) -> Path:
    from edge_dlm.cli.bench_shapes import shape_config
    from edge_dlm.model.testing import build_tokenizer, random_state, SAMPLE_TEXT
    from edge_dlm.model.weights import save_checkpoint

    cfg = shape_config(shape, layers)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(SAMPLE_TEXT * 4, 512, out)
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, std=0.02).items()}
    save_checkpoint(state, cfg, out)
    return out


def machine_facts() -> dict:
    """What differs between machines of one kind and moves these ratios: the kernel variant this CPU loads
    (bf16 with or without AVX512-BF16), whose threads the kernels run on, the memory's copy rate on one
    thread (decode reads every weight once a token) and how busy the machine is (load average)."""
    import os

    from edge_dlm.kernels import cpu_build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(5))
    torch.set_num_threads(threads)
    return {"kernel variant": cpu_build.variant()[0], "kernel threads": cpu_build.threads(),
            "copy GB/s, 1 thread (read + write)": round(2 * src.numel() / best / 1e9, 1),
            "load average (1 min)": round(os.getloadavg()[0], 2)}


def timed(fn, repeats: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


class EdgeDlm:
    def __init__(self, path: Path, dtype: str, quant: str | None, compile_: str, threads: int) -> None:
        from edge_dlm.runtime import load

        self.rt = load(path, device="cpu", dtype=dtype, quant=quant, group_size=32, compile=compile_, lora=False,
                       threads=threads)
        self.model = self.rt.model

    def run(self, ids: list[int], context: int, steps: int, prefill_n: int) -> dict[str, float]:
        from edge_dlm.primitives.attention import BLOCK, CAUSAL

        m = self.model
        cache = m.new_cache(max(len(ids), context + steps + 16) + 16)
        tok = torch.tensor([ids])
        with torch.inference_mode():
            def prefill():
                cache.truncate(0)
                m(tok[:, :prefill_n], torch.arange(prefill_n)[None], cache=cache, attn=CAUSAL, last_only=True)
                cache.commit(0)
            pre = timed(prefill)
            cache.truncate(0)
            m(tok[:, :context], torch.arange(context)[None], cache=cache, attn=CAUSAL, last_only=True)
            cache.commit(context)
            one = torch.tensor([[ids[context]]])

            def step():
                pos = torch.tensor([[cache.length]])
                m(one, pos, cache=cache, attn=CAUSAL)
                cache.commit(1)
            step()
            dec = timed(step, steps)
            cache.truncate(context)
            b16 = tok[:, context:context + 16]
            pos16 = torch.arange(context, context + 16)[None]

            def wide():
                m(b16, pos16, cache=cache, attn=BLOCK)
                cache.commit(0)

            def wide_last():
                m(b16, pos16, cache=cache, attn=CAUSAL, last_only=True)
                cache.commit(0)

            def narrow():
                m(one, torch.tensor([[context]]), cache=cache, attn=BLOCK)
                cache.commit(0)
            wide(), wide_last(), narrow()
            one_t = timed(narrow, 5)
            return {"decode": 1 / dec, "prefill": prefill_n / pre, "pass16_vs_1": timed(wide, 5) / one_t,
                    "pass16_last_vs_1": timed(wide_last, 5) / one_t}


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        kw = dict(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                  verbose=False)
        self.llm = Llama(**kw)
        self.all_rows = Llama(**kw, logits_all=True)  # a batch that returns every row's logits

    def run(self, ids: list[int], context: int, steps: int, prefill_n: int) -> dict[str, float]:
        llm = self.llm

        def prefill():
            llm.n_tokens = 0
            llm.eval(ids[:prefill_n])
        pre = timed(prefill)
        llm.n_tokens = 0
        llm.eval(ids[:context])

        def step():
            llm.eval([ids[context]])
        step()
        dec = timed(step, steps)

        def width(n, llm=llm):
            def f():
                llm.n_tokens = context
                llm.eval(ids[context:context + n])
            return f
        self.all_rows.n_tokens = 0
        self.all_rows.eval(ids[:context])
        width(16)(), width(1)(), width(16, self.all_rows)()
        one = timed(width(1), 5)
        return {"decode": 1 / dec, "prefill": prefill_n / pre, "pass16_vs_1": timed(width(16, self.all_rows), 5) / one,
                "pass16_last_vs_1": timed(width(16), 5) / one}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--shape", choices=("3b", "8b"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["bf16", "q8_0", "q4_0"], choices=["bf16", "q8_0", "q4_0"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--context", type=int, default=64,
                   help="tokens in the cache before the decode steps and wide passes, the same on both sides "
                        "(llama-bench's -d)")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both",
                   help="edge-dlm eager (the default path), compiled, or both")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama.cpp is not installed: .venv/bin/pip install -e '.[llamacpp]'")
    with tempfile.TemporaryDirectory(prefix="edge-dlm-llamacpp-") as tmp:  # GBs of checkpoint and GGUFs
        return measure(a, Path(tmp))


def measure(a: argparse.Namespace, work: Path) -> int:
    import llama_cpp

    from benchlib import interleaved, record
    from edge_dlm.export.gguf import export_gguf
    from edge_dlm.primitives.machine import machine_description

    src = Path(a.model) if a.model else random_checkpoint(a.shape or "3b", a.layers, work / "ckpt")
    name = src.name if a.model else f"NLD-{a.shape or '3b'} shape, {a.layers} layers"
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    context = a.context
    ids = [1] + torch.randint(10, min(vocab, 4000), (max(a.prefill, context + 17) - 1,), generator=g).tolist()
    rows = []
    facts = machine_facts()
    for prec in a.precisions:
        quant = {"bf16": None, "q8_0": "int8", "q4_0": "int4"}[prec]
        gguf = export_gguf(src, work / f"{prec}.gguf", quant=quant, dtype="bfloat16", force=True, log=lambda *_: None)
        for threads in a.threads:
            engines = {f"llama.cpp {prec.upper()}": LlamaCpp(gguf, threads, len(ids) + 64)}
            small = (src / "model.safetensors").stat().st_size < (1 << 30)  # fp32 copies fit next to the others
            if a.compile != "on":
                engines[f"edge-dlm {prec if quant else 'bf16'} eager"] = EdgeDlm(src, "bfloat16", quant, "off", threads)
                if quant is None and small:
                    engines["edge-dlm fp32 eager"] = EdgeDlm(src, "float32", None, "off", threads)
            act = "float32" if quant or small else "bfloat16"
            if a.compile != "off":
                engines[f"edge-dlm {prec if quant else act.replace('bfloat', 'bf').replace('float', 'fp')} compiled"] \
                    = EdgeDlm(src, act, quant, "on", threads)
                if quant is None and small:  # the bf16 weights themselves too, as llama.cpp's BF16 reads them
                    engines["edge-dlm bf16 compiled"] = EdgeDlm(src, "bfloat16", None, "on", threads)
            got = interleaved({n: functools.partial(e.run, ids, context, a.steps, a.prefill) for n, e in engines.items()},
                              a.rounds, warmup=1)  # the warm-up round compiles
            for n, res in got.items():
                med = {k: statistics.median(x[k] for x in res) for k in res[0]}
                rows.append({"precision": prec, "threads": threads, "engine": n, **med})
            del engines
    print(f"{name}; {machine_description('cpu')}; llama-cpp-python "
          f"{llama_cpp.__version__}; median of {a.rounds} interleaved rounds; {context} tokens of context "
          f"on both sides")
    facts["load average at the end (1 min)"] = machine_facts()["load average (1 min)"]
    print("; ".join(f"{k}: {v}" for k, v in facts.items()) + "\n")
    print("| precision | threads | engine | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp | "
          "16-token pass / 1-token pass, all rows' logits | the same, last row's logits |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["precision"] == r["precision"] and x["threads"] == r["threads"]
                    and x["engine"].startswith("llama.cpp"))
        print(f"| {r['precision']} | {r['threads']} | {r['engine']} | {r['decode']:.1f} | "
              f"{r['decode'] / base['decode']:.2f}x | {r['prefill']:.0f} | {r['prefill'] / base['prefill']:.2f}x | "
              f"{r['pass16_vs_1']:.2f} | {r['pass16_last_vs_1']:.2f} |")
    if a.json:
        record(a.json, {"model": name, "context": context, "facts": facts, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
