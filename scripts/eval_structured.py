"""Structured output on the demo model: validity (jsonschema) over prompts x schemas x every mode, and
the grammar mask's cost per mode: constrained vs free tokens/s, and the time per model pass (free runs
the same prompt on the default path, picks made inside the pass, up to the same number of tokens; its
speculative drafts are accepted less often than a grammar's forced tokens, so tokens/s alone flatters the
constrained runs: the time per pass is the mask's cost).

    .venv/bin/python scripts/eval_structured.py --prompts 40 --out structured.json

Writes one JSON file (commit, machine, command, rows) and prints the markdown tables BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
TOPICS = ["a cat", "a city", "a book", "a planet", "a recipe", "a song", "a car", "a tree", "a river", "a robot"]
FORMS = ["Describe {} as JSON.", "Give me JSON about {}.", "def describe({}):", "Facts on {}:"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="structured.json")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = p.parse_args()
    import jsonschema

    import edge_dlm
    from test_controls import SCHEMAS

    rt = edge_dlm.load(device="cpu", compile="off", threads=a.threads)
    prompts = [f.format(t) for t in TOPICS for f in FORMS][:a.prompts]
    rows = []
    for mode in a.modes:
        valid = finished = total = tokens = 0
        free_tok = free_s = con_tok = con_s = con_nfe = free_nfe = 0.0
        for schema in SCHEMAS:
            for prompt in prompts:
                r = rt.generate(prompt, mode=mode, max_new_tokens=a.max_new_tokens, json_schema=schema, block_size=8)
                total += 1
                if r.finish_reason == "stop":
                    finished += 1
                    try:
                        jsonschema.validate(json.loads(r.text), schema)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
                con_tok += len(r.output_ids)
                con_s += r.elapsed_s
                con_nfe += r.nfe
                f = rt.generate(prompt, mode=mode, max_new_tokens=max(len(r.output_ids), 1), block_size=8)  # free:
                # the default path (picks inside the pass), at most as many tokens
                free_tok += len(f.output_ids)
                free_s += f.elapsed_s
                free_nfe += f.nfe
                tokens += len(r.output_ids)
        rows.append({"mode": mode, "answers": total, "finished": finished, "valid": valid,
                     "constrained_tok_s": con_tok / con_s, "free_tok_s": free_tok / free_s,
                     "constrained_ms_per_pass": 1e3 * con_s / con_nfe, "free_ms_per_pass": 1e3 * free_s / free_nfe,
                     "mean_tokens": tokens / total})
        print(json.dumps(rows[-1]), flush=True)
    from benchlib import record

    record(a.out, {"rows": rows})
    print("\n| mode | answers | finished | valid | constrained tok/s | free tok/s | ms/pass constrained | ms/pass free "
          "| pass cost ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['answers']} | {r['finished']} | {r['valid']} | {r['constrained_tok_s']:.0f} | "
              f"{r['free_tok_s']:.0f} | {r['constrained_ms_per_pass']:.2f} | {r['free_ms_per_pass']:.2f} | "
              f"{r['constrained_ms_per_pass'] / r['free_ms_per_pass']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
