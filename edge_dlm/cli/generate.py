"""`edge-dlm generate`: one prompt in, the text streamed to stdout (or one JSON object), stats on stderr."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(g: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_decode_args, add_model_args

    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a file")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_decode_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with the result and stats")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.cli.args import read_prompt, runtime_and_options
    from edge_dlm.decoding import Done
    from edge_dlm.runtime import Text

    prompt = read_prompt(a)
    a.one_shot_tokens = a.max_new_tokens  # --compile auto: only where a compiled start pays back in them
    rt, kw, _ = runtime_and_options(a, prompt)
    if a.json:
        result = rt.generate(prompt, raw=a.raw, **kw)
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    for ev in rt.stream(prompt, raw=a.raw, **kw):
        if isinstance(ev, Text):
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
        elif isinstance(ev, Done):
            r = ev.result
            sys.stdout.write("\n")
            acc = f", {r.mean_accepted:.2f} accepted/cycle" if r.mean_accepted is not None else ""
            print(f"[{r.mode}] {len(r.output_ids)} tokens, {r.nfe} NFE, TPF {r.tpf:.2f}{acc}, "
                  f"{r.tokens_per_s:.1f} tok/s, {r.finish_reason}", file=sys.stderr)
    return 0


