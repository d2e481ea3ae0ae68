"""`edge-dlm infill` and `edge-dlm edit`: fill a gap, or rewrite spans of a text, by denoising.

    edge-dlm infill --prefix "def add(a, b):\n    return " --suffix "\n" [--length N | --max-length N]
    edge-dlm edit --file notes.md --span 120:134 --span 300:310 [--steps S] [-o out.md]

The contract (what the masks see, NFE, stop rules) is docs/infill.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_fill_args(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_model_args

    add_model_args(p)
    p.add_argument("--steps", type=int, help="denoising step budget per window, 1..block size (default: block size)")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold, 0..1 (default: 0.9)")
    p.add_argument("--block-size", type=int, help="window size (default: the checkpoint's block size)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object with the result and stats")


def read_text(value: str | None, path: str | None, what: str) -> str | None:
    from edge_dlm.primitives.inputs import read_text as read_file

    return value if path is None else read_file(path, f"the {what} file")


def fill_kwargs(a: argparse.Namespace) -> dict:
    return dict(steps=a.steps, threshold=a.threshold, block_size=a.block_size, temperature=a.temperature, seed=a.seed)


def report(a: argparse.Namespace, result, out: str | None = None) -> int:
    if a.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    if out is not None:
        from edge_dlm.primitives.fsutil import atomic_write_bytes

        atomic_write_bytes(out, result.text.encode("utf-8"))
    else:
        sys.stdout.write(result.text + ("" if result.text.endswith("\n") else "\n"))
    filled = round(result.tpf * result.nfe)  # the tokens denoised (an edit's output_ids hold the whole text)
    print(f"[{result.mode}] {filled} tokens filled, {result.nfe} NFE, {result.finish_reason}", file=sys.stderr)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`infill`."""
    add_fill_args(p)
    p.add_argument("--prefix", default="", help="text before the gap")
    p.add_argument("--suffix", default="", help="text after the gap")
    p.add_argument("--prefix-file", help="read the prefix from a file")
    p.add_argument("--suffix-file", help="read the suffix from a file")
    p.add_argument("--length", type=int, help="tokens to fill, 0..block size (default: chosen, see --max-length)")
    p.add_argument("--max-length", type=int, help="longest fill tried when --length is not given (default B - 1)")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.session.load import load_runtime
    from edge_dlm.primitives.errors import UserError

    prefix = read_text(a.prefix, a.prefix_file, "prefix")
    suffix = read_text(a.suffix, a.suffix_file, "suffix")
    if not prefix and not suffix:
        raise UserError("infill needs --prefix/--prefix-file or --suffix/--suffix-file")
    rt = load_runtime(a)
    return report(a, rt.infill(prefix, suffix, length=a.length, max_length=a.max_length, **fill_kwargs(a)))


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    add_fill_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to edit")
    src.add_argument("--file", help="read the text to edit from a file")
    p.add_argument("--span", action="append", required=True, metavar="START:END",
                   help="character range to rewrite (repeatable)")
    p.add_argument("-o", "--output", help="write the edited text here (atomically) instead of stdout")


def run_edit(a: argparse.Namespace) -> int:
    from edge_dlm.primitives.errors import UserError
    from edge_dlm.primitives.fsutil import check_output_file
    from edge_dlm.session.load import load_runtime

    spans = []
    for s in a.span:
        try:
            start, end = (int(x) for x in s.split(":"))
        except ValueError:
            raise UserError(f"--span {s!r} is not START:END (two character offsets)") from None
        spans.append((start, end))
    text = read_text(a.text, a.file, "text")
    if not text or not text.strip():
        raise UserError("the text to edit is empty")
    if a.output is not None:
        check_output_file(a.output)
    rt = load_runtime(a)
    return report(a, rt.edit(text, spans, **fill_kwargs(a)), a.output)
