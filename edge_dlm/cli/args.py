"""The flags every command that loads a model shares, and how they become a request.

`add_model_args` (which model, where, how), `add_decode_args` (mode and sampling) and `add_auto_args`
(what `--mode auto` optimizes); `runtime_and_options` turns them into a loaded Runtime and the request's
options, checking the request before any calibration runs.
"""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.inputs import read_text
from edge_dlm.session.calibrate import PREFER
from edge_dlm.session.load import load_auto, load_runtime, say

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
                   help="compute dtype (default auto: bfloat16 on CUDA; on a CPU bfloat16 for a bfloat16 "
                        "checkpoint of 512 MiB or more, else float32)")
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
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="run the torch engine's passes compiled (torch.compile; CUDA graphs on a GPU): on, off, or "
                   "auto: on where `edge-dlm calibrate` compiled them on this machine and measured them faster")
    p.add_argument("--threads", type=int, help="CPU threads for the model's passes (default: $EDGE_DLM_THREADS, "
                   "else half the CPUs, which stays fast when other programs run)")


def add_auto_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefer", choices=PREFER, default="speed",
                   help="what --mode auto optimizes: speed (default), energy (J/token), quality (lossless only)")
    p.add_argument("--power-budget", type=float, metavar="WATTS",
                   help="--mode auto runs the fastest configuration whose measured average power fits")
    p.add_argument("--allow-lossy", action="store_true",
                   help="let --mode auto pick diffusion step budgets (faster, not AR's exact text)")


def add_decode_args(p: argparse.ArgumentParser, default_max: int = 256) -> None:
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


    c = p.add_argument_group("output controls (every mode; the lossless ones stay equal to AR)")
    c.add_argument("--stop", action="append", metavar="TEXT", help="end the output before TEXT (repeatable)")
    c.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    c.add_argument("--ignore-eos", action="store_true", help="never stop at end-of-sequence (benchmarks)")
    c.add_argument("--repeat-penalty", type=float, help="divide (multiply) the positive (negative) logits of "
                   "recent tokens by X, as llama.cpp and Ollama do (1: off)")
    c.add_argument("--repeat-last-n", type=int, help="the penalties' window in tokens (default 64; -1: all)")
    c.add_argument("--frequency-penalty", type=float, help="subtract X per earlier occurrence (-2..2)")
    c.add_argument("--presence-penalty", type=float, help="subtract X once from every token seen (-2..2)")
    c.add_argument("--logprobs", type=int, metavar="N", help="with --json: each token's logprob and the top N")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this schema")
    g.add_argument("--json-output", action="store_true", help="the output is a JSON object")
    g.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar")
    g.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")


# the output controls' request keys (`decode_kwargs`), which the chat screen passes through as they are
CONTROLS = ("stop", "min_tokens", "ignore_eos", "repeat_penalty", "repeat_last_n", "frequency_penalty",
            "presence_penalty", "logprobs", "json", "regex", "json_schema", "grammar")


def decode_kwargs(a: argparse.Namespace) -> dict:
    kw = dict(mode=a.mode, steps=a.steps, threshold=a.threshold, block_size=a.block_size,
              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
              max_new_tokens=a.max_new_tokens)
    extra = dict(stop=tuple(a.stop) if a.stop else None, min_tokens=a.min_tokens or None,
                 ignore_eos=a.ignore_eos or None, repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                 frequency_penalty=a.frequency_penalty, presence_penalty=a.presence_penalty, logprobs=a.logprobs,
                 json=a.json_output or None, regex=a.regex)
    if a.json_schema is not None:
        text = read_text(a.json_schema, "--json-schema")
        try:
            extra["json_schema"] = json.loads(text)
        except ValueError as exc:
            raise UserError(f"--json-schema {a.json_schema}: not JSON ({str(exc)[:80]})") from None
    if a.grammar is not None:
        extra["grammar"] = read_text(a.grammar, "--grammar")
    return {**kw, **{k: v for k, v in extra.items() if v is not None}}


def runtime_and_options(a: argparse.Namespace, prompt: str | None = None, measure: str = "never"):
    """The runtime and the request options of decoding flags; `--mode auto` resolved (reason on stderr),
    measuring an unmeasured machine as `measure` says (`edge_dlm.session.load.load_auto`). The options
    (and `prompt`, if given) are checked before a calibration runs. Returns (runtime, options, Auto or None)."""
    kw = decode_kwargs(a)
    if a.mode == "auto" and a.steps is not None:
        kw["mode"] = "diffusion"  # a step budget only means something to diffusion
    if kw["mode"] != "auto":
        return load_runtime(a, kw["mode"], kw["steps"]), kw, None

    def check(rt) -> None:
        probe = {**kw, "mode": "ar"}
        if prompt is None:
            rt.options(**probe)
        else:
            rt.prepare(prompt, raw=a.raw, **probe)

    auto = load_auto(a, check=check, measure=measure)
    say(auto.reason)
    kw.update(mode=auto.row.mode, steps=auto.row.steps)
    return auto.runtime, kw, auto


def read_prompt(a: argparse.Namespace) -> str:
    text = read_text(a.prompt_file, "--prompt-file") if a.prompt_file is not None else a.prompt
    if not text or not text.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT or a non-empty --prompt-file")
    return text


