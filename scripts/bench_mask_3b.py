"""The grammar mask's cost at the NLD-3B shape: every mode's time per model pass, constrained by a JSON
schema against free, on a random-weight model at the real layer shape and vocabulary (131072 tokens).

    .venv/bin/python scripts/bench_mask_3b.py --layers 26 --quant int4 --out bench_results/mask_3b.json

The model has random weights (nothing is downloaded), quantized as a laptop runs it (`--quant`, groups of
32) and built for the C kernels as the runtime's loader builds it; the tokenizer is
`bench_mask_vocab.py`'s (byte-level tokens cut from Python's standard library up to the vocabulary).
Random weights pick random tokens: a free run decodes `--tokens` tokens (an EOS among 131072 random picks
is rare: the tokens each run decoded are recorded), a constrained
one answers the structured-output benchmark's first schema (the grammar forces valid JSON whatever the
weights), up to the same count, interleaved in rounds (a busy neighbour slows both alike). Their passes
differ in number and mix (a grammar's forced tokens commit more per diffusion step and are accepted as
drafts more often than random picks; the prompt's pass weighs on a short answer), so each run's time is
split with hooks on the model: the passes themselves, and the host's work between them (picks, masks,
the decoder). The mask's cost is the time per pass with the constrained run's host work over the time per
pass with the free run's, at the free run's mean pass (`ratio`; the target is <= 1.03 at this shape);
the raw time per pass of each run is kept beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


def tokenizer(cfg, out: Path):
    """A byte-level tokenizer of `cfg.vocab_size` tokens with the config's special ids in place."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from bench_mask_vocab import vocabulary
    from edge_dlm.primitives.tokenizer import Tokenizer as EdgeTokenizer

    specials = {0: "<unk>", cfg.bos_token_id: "<s>", cfg.eos_token_id: "</s>", cfg.mask_token_id: "<mask>"}
    rest = iter([t for t in vocabulary(cfg.vocab_size) if t not in specials.values()])
    vocab = [specials[i] if i in specials else next(rest) for i in range(cfg.vocab_size)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials.values()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "mask_token": "<mask>"}))
    return EdgeTokenizer.from_dir(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--quant", choices=("int4", "int8", "none"), default="int4")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import torch

    from benchlib import interleaved
    from test_controls import SCHEMAS
    from edge_dlm.cli.bench_shapes import random_model, shape_config
    from edge_dlm.kernels.backend import Backend
    from edge_dlm.model.quant import QuantSpec
    from edge_dlm.model.quantize import quantize_model
    from edge_dlm.runtime import Runtime

    torch.set_num_threads(a.threads)
    cfg = shape_config("3b", a.layers)
    t0 = time.perf_counter()
    model = random_model(cfg, torch.bfloat16, torch.device("cpu"))
    if a.quant != "none":
        quantize_model(model, QuantSpec(a.quant, group_size=32))
    Backend(cpu=True).apply(model)
    with tempfile.TemporaryDirectory() as d:
        rt = Runtime(model, tokenizer(cfg, Path(d)), Path(d), torch.device("cpu"), torch.bfloat16,
                     quant=None if a.quant == "none" else a.quant, name="NLD-3B shape")
        print(f"{a.layers} layers, {a.quant}, built in {time.perf_counter() - t0:.0f} s", flush=True)
        prompt = [cfg.bos_token_id] + list(range(1000, 1040))
        in_pass = [0.0]

        def start(module, args):
            in_pass.append(time.perf_counter())

        def stop(module, args, out):
            in_pass[0] += time.perf_counter() - in_pass.pop()
        model.register_forward_pre_hook(start)
        model.register_forward_hook(stop)
        schema = SCHEMAS[0]
        rows = []
        for mode in a.modes:
            runs = {"free": {}, "constrained": dict(json_schema=schema)}

            def run(kw):  # seconds, of them in passes, passes, tokens
                in_pass[0] = 0.0
                res = rt.generate(prompt, mode=mode, max_new_tokens=a.tokens, **kw)  # noqa: B023 (called now)
                return res.elapsed_s, in_pass[0], res.nfe, len(res.output_ids)
            rounds = interleaved({k: functools.partial(run, kw) for k, kw in runs.items()}, a.rounds, warmup=1)
            got = {k: [sum(col) for col in zip(*rs)] for k, rs in rounds.items()}
            per = {k: 1e3 * s / n for k, (s, _, n, _) in got.items()}
            host = {k: 1e3 * (s - sp) / n for k, (s, sp, n, _) in got.items()}
            pass_ms = 1e3 * got["free"][1] / got["free"][2]
            row = {"mode": mode, "pass_ms": round(pass_ms, 2), "host_ms_per_pass": {k: round(v, 3) for k, v in host.items()},
                   "ratio": round((pass_ms + host["constrained"]) / (pass_ms + host["free"]), 4),
                   "raw_ms_per_pass": {k: round(v, 2) for k, v in per.items()},
                   "passes": {k: v[2] for k, v in got.items()}, "tokens": {k: v[3] for k, v in got.items()}}
            rows.append(row)
            print(row, flush=True)
    if a.out:
        from benchlib import record

        record(a.out, {"shape": "3b", "layers": a.layers, "quant": a.quant, "threads": a.threads,
                       "tokens": a.tokens, "rounds": a.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
