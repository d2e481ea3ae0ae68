"""The `edge-dlm` command line: one module per subcommand in this package, the shared flags in `args`.

Subcommands import their heavy dependencies lazily, so `edge-dlm --help` loads neither torch nor any
extra. This package is the top layer: nothing else in edge-dlm imports it (docs/architecture.md)."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from edge_dlm.cli.args import Parser
from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.inputs import os_error


def build_parser() -> Parser:
    p = Parser(prog="edge-dlm", description="Run Nemotron-Labs-Diffusion models locally: AR, block "
               "diffusion and self-speculative decoding.")
    p.add_argument("--version", action="version", version=f"edge-dlm {__import__('edge_dlm').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    for name, target, help_ in COMMANDS:
        sp = sub.add_parser(name, help=help_)
        module, _, variant = target.partition(":")  # "module:name" -> add_name_arguments / run_name
        sp.set_defaults(module=module, variant=variant)
        getattr(importlib.import_module(module), f"add_{variant}_arguments" if variant else "add_arguments")(sp)
    return p


# Subcommands in their own modules, each with `add_arguments(parser)` and `run(args) -> int`; those
# modules import nothing heavy at module level. (name, module, help)
COMMANDS: list[tuple[str, str, str]] = [
    ("generate", "edge_dlm.cli.generate", "generate text from a prompt"),
    ("chat", "edge_dlm.cli.chat", "chat with a model (full-screen UI, or --plain)"),
    ("bench", "edge_dlm.cli.bench", "measure tokens/s, TPF, memory and energy per mode against baselines"),
    ("export", "edge_dlm.cli.export", "quantize a checkpoint and compile it to ONNX / TensorRT"),
    ("serve", "edge_dlm.cli.serve", "serve the model over a local OpenAI-compatible HTTP API"),
    ("calibrate", "edge_dlm.cli.calibrate", "measure every mode on this machine for --mode auto (cached)"),
    ("pull", "edge_dlm.cli.hub:pull", "fetch ORG/NAME[@REVISION] from the Hugging Face Hub (safetensors and JSON only)"),
    ("list", "edge_dlm.cli.hub:list", "the models in the Hugging Face cache, with sizes and quantization"),
    ("rm", "edge_dlm.cli.hub:rm", "remove a model (or one revision) from the Hugging Face cache"),
    ("doctor", "edge_dlm.cli.doctor", "show which engines, devices, kernels and quantizers can run here, and why not"),
    ("infill", "edge_dlm.cli.fill", "fill the gap between a prefix and a suffix (diffusion only)"),
    ("edit", "edge_dlm.cli.fill:edit", "rewrite character spans of a text in place (diffusion only)"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = getattr(importlib.import_module(args.module), f"run_{args.variant}" if args.variant else "run")
    try:
        return func(args)
    except UserError as exc:
        print(f"edge-dlm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file the command was pointed at: one line naming it, as for any bad input
        import errno

        disk = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EFBIG)
        if exc.filename is None and exc.errno in disk and not isinstance(exc, BrokenPipeError):
            # a write into an open file failed (the writers leave nothing partial: temp path, then rename)
            print(f"edge-dlm: error: a write failed: {exc.strerror or exc} (errno {exc.errno}); nothing was left "
                  "half-written; free space or choose another output folder", file=sys.stderr)
            return 2
        if exc.filename is None or isinstance(exc, BrokenPipeError):
            raise
        print(f"edge-dlm: error: {os_error(exc.filename, exc, 'file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-dlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0

