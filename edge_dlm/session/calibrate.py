"""Calibration and `--mode auto`: measure each configuration on this machine once, then pick from the table.

`calibrate()` runs every configuration — AR, LinearSpec, QuadraticSpec and diffusion at step budgets
1/2/4/8 — on a few bundled code prompts (greedy, 32 new tokens, after a warm-up) and records
tokens/s, TPF and, where a meter exists (`edge_dlm.primitives.power`), average watts and J/token. With
`--engine auto`, a float32 checkpoint on the CPU and onnxruntime installed, it also builds the model's
ONNX engine once into the user cache (the checkpoint is never touched) and measures it too, so auto
can pick the faster engine.

The table is cached as JSON under the platformdirs user cache dir, keyed by what the numbers depend on:
the model (config.json, and every weight file's name, size and modification time — cheap for a 16 GB
checkpoint, and changed by any rewrite), the device and machine, dtype, quantization, LoRA, kernels
and the versions of edge-dlm, torch, safetensors and onnxruntime. Any change means a new key, hence a fresh
measurement. `edge-dlm calibrate` re-runs it; `edge-dlm doctor --model DIR` prints it.

`choose(table, prefer, power_budget, allow_lossy, engines)` is the auto rule:

- candidates: the lossless modes (AR, LinearSpec, QuadraticSpec), on the engines allowed; diffusion
  step budgets join only with `allow_lossy` (never with prefer "quality");
- with a power budget: only those whose measured average power fits it (no meter: an error, not a
  guess; none fits: an error naming the lowest measured);
- then "speed" (default) and "quality" take the highest tokens/s, "energy" the lowest J/token
  (the highest tokens/s where no meter exists, said so).
It returns the row and a one-line reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Callable

from edge_dlm.primitives.errors import UserError, install_hint
from edge_dlm.primitives.fsutil import cache_root
from edge_dlm.primitives.inputs import read_json_object

LOSSLESS = ("ar", "linear-spec", "quadratic-spec")
PREFER = ("speed", "energy", "quality")
DIFFUSION_STEPS = (1, 2, 4, 8)
AUTO_ENGINE = "onnxruntime"  # the engine auto may build into the cache
VOLATILE = ("created", "export_seconds", "source")  # manifest fields that change with every identical export
AUTO_BUILD_BYTES = 2 << 30  # ... for weights up to this size: never a multi-gigabyte build nobody asked for
FORMAT = 2


@dataclasses.dataclass
class Row:
    engine: str
    mode: str
    steps: int | None
    tokens_per_s: float
    tpf: float
    watts: float | None = None
    joules_per_token: float | None = None

    @property
    def lossless(self) -> bool:
        return self.mode in LOSSLESS

    @property
    def name(self) -> str:
        return f"{self.mode} S={self.steps}" if self.steps else self.mode


@dataclasses.dataclass
class Table:
    key: str
    rows: list[Row]
    meta: dict

    def to_json(self) -> dict:
        return {"format": FORMAT, "key": self.key, "meta": self.meta,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, d: dict) -> "Table":
        return cls(d["key"], [Row(**r) for r in d["rows"]], d["meta"])

    def format(self) -> str:
        m = self.meta
        head = (f"calibration of {m['model']}: {m['device']} ({m['machine']}), {m['dtype']}"
                f"{', ' + m['quant'] if m.get('quant') else ''}; energy: {m['energy']}; measured {m['created']}")
        lines = [head, f"  {'engine':<12} {'configuration':<16} {'tok/s':>8} {'TPF':>6} {'W':>7} {'J/token':>9}"
                       "  lossless"]
        for r in self.rows:
            w = f"{r.watts:.1f}" if r.watts is not None else "n/a"
            j = f"{r.joules_per_token:.4f}" if r.joules_per_token is not None else "n/a"
            lines.append(f"  {r.engine:<12} {r.name:<16} {r.tokens_per_s:>8.1f} {r.tpf:>6.2f} {w:>7} {j:>9}  "
                         f"{'yes' if r.lossless else 'no'}")
        for engine, why in m.get("not_measured", {}).items():
            lines.append(f"  ({engine} not measured: {why})")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a measurement is of: a model directory as loaded with these options on this device."""

    path: Path
    device: str
    dtype: str
    quant: str | None
    group_size: int
    lora: bool
    kernels: str
    engine: str  # the engine the request names ("auto" lets calibration add the ONNX engine)
    threads: int = 1  # CPU threads the passes use


def target(a: argparse.Namespace) -> Target:
    """The `Target` of CLI model arguments (cheap: resolves names, loads nothing)."""
    from edge_dlm.hub import resolve
    from edge_dlm.model.config import NLDConfig
    from edge_dlm.model.weights import check_dir
    from edge_dlm.primitives.machine import threads_for
    from edge_dlm.primitives.device import resolve_device, resolve_dtype

    path = check_dir(resolve(a.model)).resolve()
    NLDConfig.from_file(path / "config.json")  # validated before anything reads it for the key
    dev = resolve_device(a.device)
    dtype = str(resolve_dtype(None if a.dtype == "auto" else a.dtype, dev, path)).removeprefix("torch.")
    return Target(path, str(dev), dtype, a.quant, a.group_size if a.quant else 0, not a.no_lora, a.kernels, a.engine,
                  threads_for(getattr(a, "threads", None)))


def runtime_target(rt) -> Target:
    """The `Target` of an already loaded Runtime (embedding API, tests): its own engine only."""
    import torch

    return Target(rt.path.resolve(), str(rt.device), str(rt.dtype).removeprefix("torch."), rt.quant_scheme, 0,
                  rt.has_lora, "on" if rt.kernels else "off", rt.engine, torch.get_num_threads())


def configurations(block: int) -> list[tuple[str, int | None]]:
    return [(m, None) for m in LOSSLESS] + [("diffusion", s) for s in DIFFUSION_STEPS if s <= block]


def table_key(t: Target) -> str:
    """What the measurement depends on: the model files, the machine, the options and the software."""
    from edge_dlm.primitives.machine import machine_description
    from edge_dlm.export.manifest import tool_versions

    h = hashlib.sha256()
    h.update((t.path / "config.json").read_bytes())
    where = str(t.path)
    if (t.path / "manifest.json").exists():
        # an edge-dlm artifact: what it is (source checksum, scheme, files), not when or where it was
        # written, so re-exporting the same thing reuses its measurements
        m = read_json_object(t.path / "manifest.json")
        h.update(json.dumps({k: v for k, v in m.items() if k not in VOLATILE}, sort_keys=True, default=str).encode())
        where = None
    else:
        for f in sorted(p for p in t.path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".onnx", ".plan")):
            st = f.stat()
            h.update(f"{f.relative_to(t.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps([where, machine_description(t.device, t.threads), t.device, t.dtype, t.quant, t.group_size,
                         t.lora, t.kernels, t.engine == "auto", tool_versions("onnxruntime")]).encode())
    return h.hexdigest()


def cache_file(key: str) -> Path:
    return cache_root() / "calibration" / f"{key[:32]}.json"


def artifact_dir(key: str) -> Path:
    """Where auto builds the ONNX engine of the model it calibrates (one per table key)."""
    return cache_root() / "engines" / key[:32] / "onnx"


def load_table(key: str) -> Table | None:
    """The cached table for this key, or None (absent, other format, unreadable)."""
    path = cache_file(key)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # cut short, junk, a folder in its place
        from edge_dlm.primitives.fsutil import set_aside

        set_aside(path, f"unreadable: {type(exc).__name__}")
        return None
    if isinstance(d, dict) and (d.get("format") != FORMAT or d.get("key") != key):
        return None  # another version's table: measured again, overwritten
    try:
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        return Table.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # valid JSON of the wrong shape
        from edge_dlm.primitives.fsutil import set_aside

        set_aside(path, f"wrong shape: {str(exc)[:80]}")
        return None


def onnx_candidate(t: Target, engine: str) -> str | None:
    """None when auto may build and measure the ONNX engine for `t`, else why not."""
    if t.engine != "auto":
        return f"--engine {t.engine} was asked for"
    if engine != "torch":
        return f"the model is already a {engine} artifact"
    if t.device != "cpu":
        return "the onnxruntime build here runs on the CPU only"
    raw = read_json_object(t.path / "config.json")
    quantized = t.quant or raw.get("quantization") or raw.get("quantization_config")
    if t.dtype != "float32" or quantized:
        return "auto builds float32 ONNX engines only (quantized or half weights run on torch)"
    size = sum(f.stat().st_size for f in t.path.glob("*.safetensors"))
    if size > AUTO_BUILD_BYTES:
        return (f"the weights are {size / 2**30:.1f} GiB: auto builds engines only up to "
                f"{AUTO_BUILD_BYTES / 2**30:.0f} GiB; `edge-dlm export --target onnx` builds one when asked")
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({install_hint('onnx')})"
    return None


def prompts(n: int = 3) -> list[str]:
    from edge_dlm.primitives.prompts import bundled

    return bundled("code")[:n]


class Stopped(Exception):
    """A calibration asked to stop (`cancel` set) before it finished; nothing was cached."""


def measure(rt, sampler, *, max_new_tokens: int, n_prompts: int, skipped: dict,
            step: Callable[[str], None] = lambda label: None, cancel=None) -> list[Row]:
    """One row per configuration of `rt` (its engine), each after its own warm-up run. The prompts are
    cut to a quarter of the context (and so are the new tokens); a configuration the context cannot
    hold at all is left out, its reason in `skipped`."""
    ctx = rt.config.max_position_embeddings
    texts = [rt.encode(t, raw=True)[: max(1, ctx // 4)] for t in prompts(n_prompts)]
    new = max(1, min(max_new_tokens, ctx // 4))
    rows = []
    rt.generate(texts[0], mode="ar", max_new_tokens=min(new, 8))  # allocator, threads
    for mode, steps in configurations(rt.config.block_size):
        if cancel is not None and cancel.is_set():
            raise Stopped()
        name = f"{mode}{f' S={steps}' if steps else ''}"
        step(f"{rt.engine} {name}")
        try:
            rt.generate(texts[0], mode=mode, steps=steps, max_new_tokens=min(new, 8))
        except UserError as exc:
            skipped[f"{rt.engine} {name}"] = str(exc)
            continue
        tokens = nfe = 0
        elapsed = 0.0
        sampler.start()
        for text in texts:
            r = rt.generate(text, mode=mode, steps=steps, max_new_tokens=new)
            tokens += len(r.output_ids) + (r.finish_reason == "stop")
            nfe += r.nfe
            elapsed += r.elapsed_s
        reading = sampler.stop()
        rows.append(Row(rt.engine, mode, steps, round(tokens / elapsed, 2) if elapsed else 0.0,
                        round(tokens / max(nfe, 1), 3),
                        round(reading.watts, 2) if reading.watts is not None else None,
                        round(reading.joules / tokens, 5) if reading.joules is not None and tokens else None))
    return rows


def calibrate(rt, t: Target, *, sampler=None, max_new_tokens: int = 32, n_prompts: int = 3, cancel=None,
              progress: Callable[[str, int, int], None] | None = None, log=None, key: str | None = None) -> Table:
    """Measure every configuration of `rt` (and of the auto-built ONNX engine where it may be built),
    cache the table and return it."""
    from edge_dlm.primitives.fsutil import write_cache
    from edge_dlm.primitives.power import Sampler

    sampler = sampler or Sampler(str(rt.device))
    key = key or table_key(t)
    why_not = onnx_candidate(t, rt.engine)
    n_configs = len(configurations(rt.config.block_size))
    total = n_configs * (1 if why_not else 2) + (0 if why_not else 1)
    done = 0

    def step(label: str) -> None:
        nonlocal done
        if progress:
            progress(label, done, total)
        done += 1

    skipped: dict[str, str] = {}
    rows = measure(rt, sampler, max_new_tokens=max_new_tokens, n_prompts=n_prompts, skipped=skipped, step=step,
                   cancel=cancel)
    if why_not is None:
        if cancel is not None and cancel.is_set():
            raise Stopped()
        step("building the ONNX engine (once)")
        other = open_onnx(t, key, build=True, log=log)
        rows += measure(other, sampler, max_new_tokens=max_new_tokens, n_prompts=n_prompts, skipped=skipped,
                        step=step, cancel=cancel)
        other.model.close()
    if progress:
        progress("done", total, total)
    from edge_dlm.primitives.machine import machine_description

    table = Table(key, rows, {"model": str(t.path), "device": t.device,
                              "machine": machine_description(t.device, t.threads),
                              "dtype": t.dtype, "quant": rt.quant_scheme, "energy": sampler.label,
                              "created": time.strftime("%Y-%m-%d %H:%M"), "max_new_tokens": max_new_tokens,
                              "prompts": n_prompts,
                              "not_measured": {**({} if why_not is None else {AUTO_ENGINE: why_not}), **skipped}})
    write_cache(cache_file(key), (json.dumps(table.to_json(), indent=2) + "\n").encode(), "the calibration table")
    return table


def open_onnx(t: Target, key: str, *, build: bool, log=None):
    """The auto-built ONNX engine of `t` as a Runtime (built first if `build` and absent), or None."""
    from edge_dlm.hub import display_name
    from edge_dlm.runtime import load

    out = artifact_dir(key)
    if not (out / "manifest.json").exists():
        if not build:
            return None
        from edge_dlm.export.onnx import export_onnx

        export_onnx(t.path, out, dtype="float32", force=True, log=log or (lambda m: None))
    return load(out, device=t.device, engine=AUTO_ENGINE, lora=t.lora, name=display_name(t.path))


def check_preferences(prefer: str, power_budget: float | None) -> None:
    """What `choose` takes, checked before anything is measured."""
    if prefer not in PREFER:
        raise UserError(f"--prefer {prefer} not supported; known: {', '.join(PREFER)}")
    if power_budget is not None and (isinstance(power_budget, bool) or not isinstance(power_budget, (int, float))
                                     or not 0 < power_budget < float("inf")):
        raise UserError(f"--power-budget must be a positive number of watts, got {power_budget}")


def choose(table: Table, prefer: str = "speed", power_budget: float | None = None,
           allow_lossy: bool = False, engines: set[str] | None = None) -> tuple[Row, str]:
    """The configuration auto runs, and why (see the module docstring)."""
    check_preferences(prefer, power_budget)
    rows = [r for r in table.rows if (engines is None or r.engine in engines)
            and (r.lossless or (allow_lossy and prefer != "quality"))]
    if not rows:
        raise UserError("the calibration table has no configuration for this engine; run edge-dlm calibrate")
    why = []
    if power_budget is not None:
        measured = [r for r in rows if r.watts is not None]
        if not measured:
            raise UserError(f"--power-budget needs measured watts and this calibration has none (energy: "
                            f"{table.meta.get('energy', 'n/a')}); it needs NVML on an NVIDIA GPU, readable RAPL "
                            "counters or a laptop on battery, else drop the budget")
        fits = [r for r in measured if r.watts <= power_budget]
        if not fits:
            low = min(measured, key=lambda r: r.watts)
            hint = "" if allow_lossy else "; --allow-lossy admits the diffusion step budgets"
            raise UserError(f"no configuration fits {power_budget:g} W: the lowest measured is {low.name} at "
                            f"{low.watts:.1f} W{hint}")
        rows = fits
        why.append(f"within {power_budget:g} W")
    best = max(rows, key=lambda r: r.tokens_per_s)
    if prefer == "energy":
        metered = [r for r in rows if r.joules_per_token is not None]
        if metered:
            best = min(metered, key=lambda r: r.joules_per_token)
            why.append(f"lowest energy: {best.joules_per_token:.4f} J/token")
        else:
            why.append("no energy meter here, so the fastest")
    else:
        why.append(f"fastest {'lossless' if best.lossless else 'configuration'} here")
    ar = max((r for r in table.rows if r.mode == "ar" and (engines is None or r.engine in engines)),
             key=lambda r: r.tokens_per_s, default=None)
    speed = f"{best.tokens_per_s:.0f} tok/s"
    if ar is not None and ar is not best:
        speed += f" vs AR {ar.tokens_per_s:.0f}" + (f" on {ar.engine}" if ar.engine != best.engine else "")
    why.append(speed)
    if best.watts is not None:
        why.append(f"{best.watts:.1f} W")
    return best, f"auto: {best.name} on {best.engine} ({'; '.join(why)})"
