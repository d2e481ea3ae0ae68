"""Compiled step functions: `NLDModel.cached_pass` under torch.compile, once per pass shape and bucket.

A cached pass is already static: its shapes depend on (T, pattern, window bucket, LoRA, head rows)
and the cache's shape only; the committed length, the positions and the rows are device tensors
(`edge_dlm.primitives.cache`). So `torch.compile(fullgraph=True, dynamic=False)` traces it without a
graph break or a host synchronization, which is exactly what a CUDA graph needs: on the CPU the step
functions run as inductor's C++ kernels, on CUDA as CUDA graphs (`mode="reduce-overhead"`). A pass of
a new shape compiles once; the decoders bound those shapes (`nld.segments`, the cache's buckets), so a
chat compiles a handful of graphs and then never again.

Compiling is paid once per machine: inductor's caches live under the edge-dlm cache folder, so a
second process finds the kernels already built and only re-traces (seconds).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from edge_dlm.primitives.errors import UserError

CHOICES = ("auto", "on", "off")
# Distinct step shapes one process may build. One model in a chat builds a handful (modes x widths x
# window buckets); dynamo's default (8 per function) would silently fall back to eager after that, and
# every model in a process shares the one function (`cached_pass`), so the bound is generous.
RECOMPILE_LIMIT = 1024


def available(device: torch.device | str) -> list[str]:
    """Why compiled passes cannot run on `device` (empty: they can)."""
    import shutil

    if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        return ["torch.compile needs a C++ compiler on the CPU (install g++)"]
    return []


def resolve(choice: str, device: torch.device | str, engine: str = "torch", kernels: bool = False) -> bool:
    """Whether `--compile choice` compiles here; `on` where it cannot is a one-line error. `auto`
    compiles when the calibration table says it pays (the caller decides; here it means off)."""
    if choice not in CHOICES:
        raise UserError(f"--compile {str(choice)[:20]} not supported; known: {', '.join(CHOICES)}")
    if choice != "on":
        return False
    if engine != "torch":
        raise UserError(f"--compile on compiles the torch engine's passes; the {engine} engine is compiled "
                        "already (drop --compile, or use --engine torch)")
    if kernels:
        raise UserError("--compile on and --kernels on both replace the eager passes; pick one")
    reasons = available(device)
    if reasons:
        raise UserError(f"--compile on, but {reasons[0]}")
    return True


def enable(model: torch.nn.Module, root: Path | None = None) -> None:
    """Route `model`'s cached passes through compiled step functions (compiled lazily, per shape).

    On the CPU: inductor's tuned kernels (`max-autotune-no-cudagraphs`) and its C++ wrapper (no Python
    between kernels): on the demo model an AR step takes 0.28 ms that way against 0.39 ms with the
    defaults and 0.76 ms eager (a 2-core EPYC, one thread). Frozen weights were faster still (0.21
    ms) but inductor does not cache frozen graphs, so every process would compile for a minute.
    On CUDA: `reduce-overhead`, i.e. CUDA graphs.
    """
    if root is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    import torch._dynamo
    import torch._inductor.config as inductor

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    inductor.fx_graph_cache = True
    cuda = any(p.is_cuda for p in model.parameters())
    if cuda:
        mode = "reduce-overhead"
    else:
        inductor.cpp_wrapper = True
        mode = "max-autotune-no-cudagraphs"
    from edge_dlm.model.quant import QuantEmbedding

    lookups = {id(m.lin) for m in model.modules() if isinstance(m, QuantEmbedding)}  # rows read, no matmul
    for mod in model.modules():  # kernel layouts of quantized weights, built before the trace
        if hasattr(mod, "prepare") and id(mod) not in lookups:
            mod.prepare()
    model.step = torch.compile(model.cached_pass, fullgraph=True, dynamic=False, mode=mode)
    model.compiled = True


def measured_faster(root: Path, key: str) -> bool:
    """Whether this machine compiled the passes of the model `key` before and measured them faster
    (`record`): then its kernels are in the cache and a process starts warm."""
    import json

    try:
        rec = json.loads((root / "records" / f"{key}.json").read_text())
        return float(rec["compiled_tokens_per_s"]) > float(rec["eager_tokens_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def record(root: Path, key: str, eager: float, compiled: float) -> None:
    """Remember a measurement of eager vs compiled AR tokens/s for `measured_faster`."""
    import json

    from edge_dlm.primitives.fsutil import atomic_write_bytes

    path = root / "records" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"eager_tokens_per_s": eager, "compiled_tokens_per_s": compiled}).encode())


def disable(model: torch.nn.Module) -> None:
    model.step = model.cached_pass
    model.compiled = False
