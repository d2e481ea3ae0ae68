"""`edge-dlm bench`: tokens/s, TPF, acceptance, TTFT, memory and energy per mode, in one run,
against two baselines measured in the same run: transformers' greedy `generate` on the same weights
and edge-dlm's own AR.

Method: for each configuration, `--warmup` untimed runs, then `--repeats` passes over the prompt set;
tokens/s is total emitted tokens / total wall time of a pass, and the reported value is the median
over passes. TPF = emitted tokens / forward passes (deterministic at temperature 0). Energy comes from
NVML on NVIDIA GPUs or the Linux powercap (RAPL) counters when readable, else "n/a".
`--shape 3b|8b` instead times single forwards at the real NLD shapes (random weights) against the
memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from edge_dlm.primitives.errors import UserError, install_hint
from edge_dlm.primitives.machine import machine_description
from edge_dlm.primitives.power import EnergyMeter
from edge_dlm.primitives.prompts import KINDS, bundled
from edge_dlm.session.load import bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_auto_args, add_model_args

    add_model_args(p)
    p.add_argument("--modes", nargs="+", default=["ar", "diffusion", "linear-spec", "quadratic-spec"],
                   choices=["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"],
                   help="configurations to run; auto: what --mode auto picks (engine included), next to the "
                   "lossless modes on the engine it picked")
    add_auto_args(p)
    p.add_argument("--steps", nargs="+", type=int, default=[2, 4, 8], help="diffusion step budgets to run")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--prompts", default="code", help="code, prose, or a file (JSON list or one per line)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    p.add_argument("--shape", choices=["3b", "8b"], help="time forwards at a real NLD shape (random weights); "
                   "with --quant also the quantized passes")
    p.add_argument("--layers", type=int, help="with --shape: this many layers instead of the shape's")
    p.add_argument("--plot", help="write a PNG of tokens/s and TPF per configuration (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


# ---- prompts ------------------------------------------------------------------------------------

def load_prompts(spec: str, n: int) -> tuple[list, bool]:
    """(prompts, raw): built-in `code` (raw completion) or `prose` (chat), or a file."""
    if spec in KINDS:
        return bundled(spec)[:n], spec == "code"
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--prompts {spec}: not 'code', 'prose' or an existing file")
    text = path.read_text(encoding="utf-8")
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {spec} holds no prompts")
    return prompts[:n], False


# ---- runs ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    name: str
    mode: str
    tokens_per_s: float
    tpf: float | None
    mean_accepted: float | None
    ttft_s: float | None
    peak_mem_mb: float
    joules_per_token: float | None
    vs_ar: float | None = None
    vs_transformers: float | None = None


class Progress:
    """The bar, with an estimate of the time left from the pace so far."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.quiet:
            left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
            bar(f"{label} (~{left:.0f} s left)" if self.done < self.total else label, self.done, self.total)


def measure(name: str, mode: str, run_one: Callable[[object], tuple[int, int, float, float | None, float | None]],
            prompts: list, a: argparse.Namespace, device: str, meter: EnergyMeter, progress: Progress) -> Row:
    """`run_one(prompt) -> (emitted tokens, nfe, elapsed, ttft, mean_accepted)`."""
    from edge_dlm.primitives.device import peak_memory_mb

    for _ in range(a.warmup):
        run_one(prompts[0])
    rates, ttfts, accs = [], [], []
    tokens_total = nfe_total = 0
    e0 = meter.read()
    for _ in range(a.repeats):
        tok = 0
        wall = 0.0
        for p in prompts:
            n, nfe, elapsed, ttft, acc = run_one(p)
            tok += n
            nfe_total += nfe
            wall += elapsed
            if ttft is not None:
                ttfts.append(ttft)
            if acc is not None:
                accs.append(acc)
        tokens_total += tok
        rates.append(tok / wall if wall > 0 else 0.0)
        progress.step(name)
    e1 = meter.read()
    return Row(name=name, mode=mode, tokens_per_s=statistics.median(rates),
               tpf=tokens_total / nfe_total if nfe_total else None,
               mean_accepted=statistics.mean(accs) if accs else None,
               ttft_s=statistics.median(ttfts) if ttfts else None, peak_mem_mb=peak_memory_mb(device),
               joules_per_token=(e1 - e0) / tokens_total if e0 is not None and e1 is not None and tokens_total else None)


def edge_runner(rt, mode: str, raw: bool, a: argparse.Namespace, steps: int | None):
    def run_one(prompt):
        r = rt.generate(prompt, raw=raw, mode=mode, max_new_tokens=a.max_new_tokens, steps=steps,
                        threshold=a.threshold)
        n = len(r.output_ids) + (r.finish_reason == "stop")
        return n, r.nfe, r.elapsed_s, r.ttft_s, r.mean_accepted
    return run_one


def transformers_runner(rt, raw: bool, a: argparse.Namespace):
    import torch

    from edge_dlm.model.reference import to_transformers

    ref = to_transformers(rt.path, dtype=rt.dtype, device=rt.device, attn_implementation="sdpa")
    eos = rt.config.eos_token_id

    def run_one(prompt):
        ids = torch.tensor([rt.encode(prompt, raw=raw)], device=rt.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=eos,
                               pad_token_id=eos)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        n = out.shape[1] - ids.shape[1]
        return n, n, elapsed, None, None
    return run_one


def run(a: argparse.Namespace) -> int:
    if a.shape:
        from edge_dlm.cli.bench_shapes import run_shapes

        if a.layers is not None and a.layers < 1:
            raise UserError("--layers must be >= 1")
        return run_shapes(a)
    if a.repeats < 1 or a.max_new_tokens < 1 or a.num_prompts < 1:
        raise UserError("--repeats, --max-new-tokens and --num-prompts must be >= 1")
    # every optional package this run will need, before any work starts
    if not a.no_baseline and importlib.util.find_spec("transformers") is None:
        raise UserError("the transformers baseline needs transformers, which is not installed: "
                        f"{install_hint('bench')}, or pass --no-baseline")
    if a.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"--plot needs matplotlib: {install_hint('bench')}")
    if a.plot:
        from edge_dlm.primitives.fsutil import check_output_file

        check_output_file(a.plot)
    from edge_dlm.session.load import load_runtime

    prompts, raw = load_prompts(a.prompts, a.num_prompts)
    rt = load_runtime(a)
    device = str(rt.device)
    meter = EnergyMeter(device)
    configs: list[tuple[str, str, int | None]] = []
    for mode in a.modes:
        if mode == "auto":
            continue
        if mode == "diffusion":
            configs += [(f"diffusion S={s}", mode, s) for s in a.steps if 1 <= s <= rt.config.block_size]
        else:
            configs.append((mode, mode, None))
    if "ar" not in a.modes:
        configs.insert(0, ("ar", "ar", None))  # the in-run baseline
    rows = []
    hf_row = None
    baseline = not a.no_baseline
    if baseline and rt.engine != "torch":
        baseline = False  # transformers needs the safetensors checkpoint; compare with the torch engine instead
        print(f"note: no transformers baseline for a {rt.engine} artifact; edge-dlm AR on it is the baseline",
              file=sys.stderr)
    if baseline and rt.quant_scheme:
        baseline = False  # transformers would run different (full-precision) weights: not a like-for-like row
        print("note: no transformers baseline for quantized weights; edge-dlm AR is the baseline",
              file=sys.stderr)
    auto, auto_configs = None, []
    if "auto" in a.modes:
        from edge_dlm.session.calibrate import LOSSLESS
        from edge_dlm.session.load import load_auto

        auto = load_auto(a, log=lambda m: None if a.json else print(m, file=sys.stderr))
        if auto.runtime.engine != rt.engine:  # the fastest lossless on auto's engine, measured here too
            auto_configs = [(f"{m} [{auto.runtime.engine}]", m, None) for m in LOSSLESS]
        auto_configs.append((f"auto: {auto.row.name} [{auto.runtime.engine}]", auto.row.mode, auto.row.steps))
    progress = Progress(a.repeats * (len(configs) + len(auto_configs) + baseline), a.json)
    if baseline:
        hf_row = measure("transformers generate", "ar", transformers_runner(rt, raw, a), prompts, a, device,
                         meter, progress)
        hf_row.tpf = 1.0
    for name, mode, steps in configs:
        rows.append(measure(name, mode, edge_runner(rt, mode, raw, a, steps), prompts, a, device, meter, progress))
    for name, mode, steps in auto_configs:
        rows.append(measure(name, mode, edge_runner(auto.runtime, mode, raw, a, steps), prompts, a, device, meter,
                            progress))
    ar = next(r for r in rows if r.name == "ar")
    for r in rows + ([hf_row] if hf_row else []):
        r.vs_ar = r.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s else None
        r.vs_transformers = r.tokens_per_s / hf_row.tokens_per_s if hf_row and hf_row.tokens_per_s else None
    all_rows = ([hf_row] if hf_row else []) + rows
    meta = {"model": str(rt.path), "engine": rt.engine, "device": device, "dtype": str(rt.dtype).removeprefix("torch."),
            "quant": rt.quant_scheme,
            "prompts": a.prompts, "num_prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
            "repeats": a.repeats, "energy": meter.source, "machine": machine_description(device),
            "auto": auto.reason if auto else None}
    if a.json:
        print(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in all_rows]}, indent=2))
    else:
        print(format_table(all_rows, meta))
    if a.plot:
        plot(all_rows, a.plot)
    return 0


def fmt(v, spec: str, suffix: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + suffix


def format_table(rows: list[Row], meta: dict) -> str:
    head = ("| configuration | tokens/s | TPF | mean accepted | TTFT ms | peak MB | J/token | vs AR | vs transformers |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.name} | {r.tokens_per_s:.1f} | {fmt(r.tpf, '.2f')} | {fmt(r.mean_accepted, '.2f')} | "
             f"{fmt(r.ttft_s and r.ttft_s * 1000, '.1f')} | {r.peak_mem_mb:.0f} | {fmt(r.joules_per_token, '.3f')} | "
             f"{fmt(r.vs_ar, '.2f', 'x')} | {fmt(r.vs_transformers, '.2f', 'x')} |" for r in rows]
    quant = f", weights {meta['quant']}" if meta.get("quant") else ""
    info = (f"{meta['model']} on {meta['device']} ({meta.get('engine', 'torch')} engine, {meta['dtype']}{quant}), "
            f"{meta['machine']}; "
            f"{meta['num_prompts']} {meta['prompts']} prompts x {meta['repeats']} repeats, "
            f"{meta['max_new_tokens']} new tokens, greedy; energy: {meta['energy']}")
    return "\n".join([info, "", head, *lines] + ([f"\n{meta['auto']}"] if meta.get("auto") else []))


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"--plot needs matplotlib: {install_hint('bench')}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_dlm.primitives.fsutil import atomic_write_bytes

    names = [r.name for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.barh(names, [r.tokens_per_s for r in rows], color="tab:blue")
    ax1.set_xlabel("tokens/s")
    ax2.barh(names, [r.tpf or 0 for r in rows], color="tab:green")
    ax2.set_xlabel("tokens per forward pass (TPF)")
    ax2.set_yticks([])
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
