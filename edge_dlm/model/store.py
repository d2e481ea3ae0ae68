"""What compiled passes keep on disk, under the edge-dlm cache folder (`compiled_cache`): each model's store
of step functions (`compiled_store`: per model, precision, machine and torch version, `compiled_key`, and per
version of the pass's code, `code_version`; read back by `read_stored`, held like input), and the records of
whether compiling paid on this machine (`record`, `measured_faster`, `measure_start`) that `--compile auto`
reads. `edge_dlm.model.compiled` compiles and calls the step functions themselves."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from edge_dlm.primitives.fsutil import cache_root


def _log(line: str) -> None:
    print(f"edge-dlm: {line}", file=sys.stderr, flush=True)


def compiled_key(rt) -> str:
    """What a compiled step function depends on: the weights, their precision, LoRA and the machine."""
    from edge_dlm.primitives.machine import machine_description

    st = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(rt.path.glob("*.safetensors"))]
    return hashlib.sha256(json.dumps([st, str(rt.dtype), rt.quant_scheme, rt.has_lora, str(rt.device),
                                      machine_description(str(rt.device)), getattr(rt, "cpu_kernels", False),
                                      torch.__version__]).encode()).hexdigest()[:32]


def compiled_store(rt) -> Path:
    """Where a model's compiled step functions are kept (`edge_dlm.model.compiled.StepFunctions.store`):
    per model, precision, machine and torch version (`compiled_key`) and edge-dlm's code."""
    return compiled_cache() / "steps" / f"{compiled_key(rt)}-{code_version()}"


def drop_old_stores(store: Path) -> None:
    """Remove the stores of the same model built by other versions of the pass's code (never loaded
    again: a new edge-dlm compiles its own), so upgrades do not pile them up on disk."""
    key = store.name.rsplit("-", 1)[0]
    if store.parent.is_dir():
        for old in store.parent.glob(f"{key}-*"):
            if old != store and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def compiled_cache() -> Path:
    """Where compiled kernels and the compile records live (the edge-dlm cache folder)."""
    return cache_root() / "compiled"


@functools.cache
def code_version() -> str:
    """A hash of the code a pass runs (the model, the primitives and the kernels: their Python, C and C++
    sources): a compiled step function is that code as traced, so a store is kept per version of it
    (`compiled_store`)."""
    # the packages' folders, found without importing them (the kernels sit above the model's layer)
    roots = [Path(importlib.util.find_spec(name).origin).parent
             for name in ("edge_dlm.model", "edge_dlm.primitives", "edge_dlm.kernels")]
    h = hashlib.sha256()
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".c", ".cpp", ".h") and f.is_file():
                h.update(f.relative_to(root.parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


MAX_STEP_BYTES = 256 << 20  # a stored step function holds code, guards and kernels, never weights: ~1 MB


def read_stored(path: Path):
    """A stored step function as torch loads it, under the grad modes its name records (its guards
    hold the dispatch keys tensors have in them); a file too large to be one is refused unread."""
    import torch._inductor.config as inductor_config

    if path.stat().st_size > MAX_STEP_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, more than a compiled step function takes")
    modes = path.stem[-2:]
    # inductor probes the CPU's vector ISAs (compiling and running test programs, 0.2-1.3 s) the first
    # time a process loads a kernel; a store is per machine, built after that probe passed here
    with open(path, "rb") as fh, inductor_config.patch({"cpp.vec_isa_ok": True}), \
            torch.inference_mode(modes[0] == "i"), torch.set_grad_enabled(modes[1] == "g"):
        return torch.compiler.load_compiled_function(fh)


def measured_faster(root: Path, key: str, tokens: int | None = None) -> bool:
    """Whether this machine compiled the passes of the model `key` before and measured them faster
    (`record`): then its step functions are in the store and a process starts warm. With `tokens` (a
    one-shot process that decodes that many), also whether the time they save pays back the start-up
    a compiled process adds (loading torch's compiler and the stored functions, `start_s`)."""
    try:
        rec = json.loads((root / "records" / f"{key}.json").read_text())
        eager, fast = float(rec["eager_tokens_per_s"]), float(rec["compiled_tokens_per_s"])
        if tokens is None:
            return fast > eager
        return fast > eager and tokens * (1 / eager - 1 / fast) > float(rec["start_s"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return False


def record(root: Path, key: str, eager: float, compiled: float, start_s: float | None = None) -> None:
    """Remember a measurement of eager vs compiled AR tokens/s (and the start-up a compiled process
    adds, `measure_start`) for `measured_faster`."""
    from edge_dlm.primitives.fsutil import write_cache

    rec = {"eager_tokens_per_s": eager, "compiled_tokens_per_s": compiled}
    if start_s is not None:
        rec["start_s"] = start_s
    write_cache(root / "records" / f"{key}.json", json.dumps(rec).encode(), "compile records")


def measure_start(paths: list[Path]) -> float | None:
    """Seconds a new process spends before its first compiled pass beyond what an eager one spends:
    importing torch's compiler and loading these stored step functions (`read_stored`), measured in a
    fresh interpreter (the median of three); None, with one line, where that process fails."""
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "import edge_dlm.runtime\n"  # what every process imports, eager or not
            "from edge_dlm.kernels import cpu_build\n"
            "cpu_build.usable()\n"  # the CPU kernels' operators, which an eager process loads too
            "t = time.perf_counter()\n"
            "from edge_dlm.model.store import read_stored\n"
            "for p in sys.argv[1:]:\n"
            "    read_stored(Path(p))\n"
            "print(time.perf_counter() - t)\n")
    runs = []
    for _ in range(3):
        try:
            out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                                 timeout=600)
        except (subprocess.TimeoutExpired, OSError) as exc:
            why = type(exc).__name__
        else:
            try:
                runs.append(float(out.stdout.split()[-1]))
                continue
            except (ValueError, IndexError):
                why = (out.stderr.strip().splitlines() or ["no answer"])[-1][:160]
        _log(f"measuring a compiled process's start failed ({why}); --compile auto keeps one-shot commands eager")
        return None
    return statistics.median(runs)
