"""The `edge-dlm` command line. Subcommands import their heavy dependencies lazily, so
`edge-dlm --help` loads neither torch nor any extra."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, NoReturn, Sequence

from edge_dlm.errors import UserError

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every bad input in edge-dlm gets."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint directory or a Hugging Face name ORG/NAME[@REVISION] "
                   "(default: the bundled demo model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-lora", action="store_true", help="ignore the LinearSpec LoRA drafter")
    p.add_argument("--quant", help="quantize on load: int8, int4 (group-wise), nf4, llm-int8 (bitsandbytes)")
    p.add_argument("--group-size", type=int, default=64, help="group size for --quant int8/int4/nf4 (default 64)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --quant int4/int8: rescale and clip the weights on calibration text first (AWQ)")
    p.add_argument("--engine", default="auto",
                   help="torch, onnxruntime, tensorrt, tensorrt-rtx, or auto: the first that can run the model "
                   "(default)")
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="Triton attention/verification kernels: auto (on with CUDA + triton), on, off")


def add_decode_args(p: argparse.ArgumentParser, default_max: int = 256) -> None:
    from edge_dlm.calibrate import add_auto_args

    p.add_argument("--mode", choices=("auto",) + MODES, default="auto",
                   help="decoding mode (default: auto, the fastest lossless mode measured on this machine)")
    add_auto_args(p)
    p.add_argument("--steps", type=int, help="diffusion step budget per block, 1..block size (default: block "
                   "size); with no --mode it means --mode diffusion")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="diffusion confidence threshold, 0..1 (default: 0.9)")
    p.add_argument("--block-size", type=int, help="override the checkpoint's block size")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--max-new-tokens", type=int, default=default_max,
                   help=f"generation budget (default: {default_max})")


def decode_kwargs(a: argparse.Namespace) -> dict:
    return dict(mode=a.mode, steps=a.steps, threshold=a.threshold, block_size=a.block_size,
                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                max_new_tokens=a.max_new_tokens)


def load_runtime(a: argparse.Namespace):
    import edge_dlm

    return edge_dlm.load(a.model, device=a.device, dtype=None if a.dtype == "auto" else a.dtype,
                         lora=not a.no_lora, quant=a.quant, group_size=a.group_size, calibrate=a.calibrate, kernels=a.kernels,
                         engine=a.engine)


def runtime_and_options(a: argparse.Namespace, prompt: str | None = None):
    """The runtime and the request options of decoding flags; `--mode auto` resolved (reason on stderr).
    The options (and `prompt`, if given) are checked before a calibration runs."""
    kw = decode_kwargs(a)
    if a.mode == "auto" and a.steps is not None:
        kw["mode"] = "diffusion"  # a step budget only means something to diffusion
    if kw["mode"] != "auto":
        return load_runtime(a), kw
    from edge_dlm.calibrate import load_auto, say

    def check(rt) -> None:
        probe = {**kw, "mode": "ar"}
        if prompt is None:
            rt.options(**probe)
        else:
            rt.prepare(prompt, raw=a.raw, **probe)

    auto = load_auto(a, check=check)
    say(auto.reason)
    kw.update(mode=auto.row.mode, steps=auto.row.steps)
    return auto.runtime, kw


def read_prompt(a: argparse.Namespace) -> str:
    if a.prompt_file is not None:
        try:
            text = open(a.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --prompt-file {a.prompt_file}: {exc}") from None
    else:
        text = a.prompt
    if not text or not text.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT or a non-empty --prompt-file")
    return text


def cmd_generate(a: argparse.Namespace) -> int:
    from edge_dlm.decoding import Done
    from edge_dlm.runtime import Text

    prompt = read_prompt(a)
    rt, kw = runtime_and_options(a, prompt)
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


def build_parser() -> Parser:
    p = Parser(prog="edge-dlm", description="Run Nemotron-Labs-Diffusion models locally: AR, block "
               "diffusion and self-speculative decoding.")
    p.add_argument("--version", action="version", version=f"edge-dlm {__import__('edge_dlm').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a file")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_decode_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with the result and stats")
    g.set_defaults(func=cmd_generate)

    for name, target, help_ in COMMANDS:
        sp = sub.add_parser(name, help=help_)
        module, _, variant = target.partition(":")  # "module:name" -> add_name_arguments / run_name
        sp.set_defaults(module=module, variant=variant)
        getattr(importlib.import_module(module), f"add_{variant}_arguments" if variant else "add_arguments")(sp)
    return p


# Subcommands in their own modules, each with `add_arguments(parser)` and `run(args) -> int`; those
# modules import nothing heavy at module level. (name, module, help)
COMMANDS: list[tuple[str, str, str]] = [
    ("chat", "edge_dlm.chat", "chat with a model (full-screen UI, or --plain)"),
    ("bench", "edge_dlm.bench", "measure tokens/s, TPF, memory and energy per mode against baselines"),
    ("export", "edge_dlm.export.cli", "quantize a checkpoint and compile it to ONNX / TensorRT"),
    ("serve", "edge_dlm.server", "serve the model over a local OpenAI-compatible HTTP API"),
    ("calibrate", "edge_dlm.calibrate", "measure every mode on this machine for --mode auto (cached)"),
    ("pull", "edge_dlm.hub:pull", "fetch ORG/NAME[@REVISION] from the Hugging Face Hub (safetensors and JSON only)"),
    ("list", "edge_dlm.hub:list", "the models in the Hugging Face cache, with sizes and quantization"),
    ("rm", "edge_dlm.hub:rm", "remove a model (or one revision) from the Hugging Face cache"),
    ("doctor", "edge_dlm.doctor", "show which engines, devices, kernels and quantizers can run here, and why not"),
    ("infill", "edge_dlm.fillcli", "fill the gap between a prefix and a suffix (diffusion only)"),
    ("edit", "edge_dlm.fillcli:edit", "rewrite character spans of a text in place (diffusion only)"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = getattr(args, "func", None) or getattr(
        importlib.import_module(args.module), f"run_{args.variant}" if args.variant else "run")
    try:
        return func(args)
    except UserError as exc:
        print(f"edge-dlm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-dlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
