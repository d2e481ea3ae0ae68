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

import functools
import os
import threading
from pathlib import Path

import torch

from edge_dlm.primitives.errors import UserError

CHOICES = ("auto", "on", "off")
# Distinct step shapes one process may build. One model in a chat builds a handful (modes x widths x
# window buckets); dynamo's default (8 per function) would silently fall back to eager after that, and
# every model in a process shares the one function (`cached_pass`), so the bound is generous.
RECOMPILE_LIMIT = 1024
# A float projection inside a compiled pass of at most this many rows is a multiply and a sum (see
# `RowsLinear`); wider passes keep the GEMM
REDUCE_ROWS = 4


class RowsLinear(torch.nn.Linear):
    """A float32 `nn.Linear` on the CPU that, inside a compiled pass of at most `REDUCE_ROWS` rows, is
    written as a multiply and a sum over the input features: inductor then emits its own vectorised
    loop for it, fused with the norm, RoPE or activation next to it, instead of an external GEMM call
    per projection (oneDNN's small-M GEMM costs 7 us for a 1 x 192 x 512 product and 17 us at 4 rows).
    Demo model, one thread: an AR step 325 -> 275 us, a 4-token block pass 650 -> 570 us. Eager passes
    and wider ones are `nn.Linear` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= REDUCE_ROWS and self.bias is None and torch.compiler.is_compiling():
            y = (x.reshape(rows, 1, self.in_features) * self.weight).sum(-1)
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


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
    defaults and 0.76 ms eager (a 2-core EPYC, one thread). Frozen weights were faster
    still but inductor does not cache frozen graphs: a second process compiled for 25 s and a new
    window bucket for 85 s, so they stay off. Float32 projections of
    narrow passes become inductor reductions (`RowsLinear`), and a pass shape's graph, once built, is
    called without dynamo's guard check (`StepFunctions`). On CUDA: `reduce-overhead`, i.e. CUDA
    graphs.
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
        head = getattr(model, "diffusion_head", None)  # its logits feed several reductions (`greedy`):
        for mod in model.modules():  # as a reduction inductor would recompute it for each one
            if type(mod) is torch.nn.Linear and mod is not head and mod.weight.dtype == torch.float32:
                mod.__class__ = RowsLinear
    from edge_dlm.model.quant import prepare_layouts

    prepare_layouts(model)  # kernel layouts of quantized weights, built before the trace
    fn = torch.compile(model.cached_pass, fullgraph=True, dynamic=False, mode=mode)
    model.step = StepFunctions(model, fn, direct=not cuda)
    model.compiled = True


class StepFunctions:
    """A model's compiled step functions: one graph per pass shape and bucket (`key`).

    Through `torch.compile` alone, every pass first looks its graph up and evaluates all of dynamo's
    guards for it (each weight's dtype, shape and strides, the pattern's fields, ...): 30-60 us per
    call on the CPU, a fifth of a demo-model AR step. But a pass's graph is named by its key, and that
    is all that tells the graphs apart. So on the CPU the first pass of a key runs through
    `torch.compile` (compiling, or loading from inductor's caches), and later ones call the code dynamo
    built for it directly (`direct`), its guards checked once: the key holds everything they read that
    can change while a model runs (the shapes, the pattern, the global modes and the thread count); the
    weights are the model's own and are not swapped under a compiled model (`disable` first). On CUDA
    every pass runs through `torch.compile`: its CUDA graphs (`reduce-overhead`) are managed by its own
    runtime, and a guard check is small beside a GPU pass."""

    def __init__(self, model: torch.nn.Module, fn, direct: bool) -> None:
        self.model, self.fn, self.direct = model, fn, direct
        self.fns: dict[tuple, object] = {}

    @property
    def keys(self) -> set[tuple]:
        return set(self.fns)

    def __call__(self, tokens, positions, length, k_buf, v_buf, attn, window, use_lora, last, pick=None,
                 sample=None, draw=None):
        args = (tokens, positions, length, k_buf, v_buf, attn, window, use_lora, last, pick, sample, draw)
        # the key: what a pass's graph depends on (`NLDModel.cached_pass`; the cache's dtype and device
        # follow the model's, `new_cache`) and the global state dynamo guards (threads, grad modes, ...)
        lora = self.model.encoder.layers[0].self_attn.o_lora is not None  # without a drafter use_lora is unread
        key = (tokens.shape, k_buf.shape, attn, window, bool(use_lora) and lora, last is None, pick, sample, lora,
               torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads(),
               torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
               torch.is_autocast_enabled("cpu"))
        fn = self.fns.get(key)
        if fn is not None:
            return fn(*args)
        with _BUILDING:
            out = self.fn(*args)
            self.fns[key] = (direct(self.model, args) if self.direct else None) or self.fn
        return out


def direct(model: torch.nn.Module, args: tuple):
    """The code dynamo built for `model.cached_pass(*args)` (run once through `torch.compile`), as a
    function to call without its guard check: dynamo's cache entry whose guards accept these inputs.
    None where this torch keeps its entries otherwise (then passes stay guarded)."""
    import types

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        fn = type(model).cached_pass
        code = fn.__code__
        f_locals = dict(zip(code.co_varnames[:code.co_argcount], (model, *args)))
        for entry in _debug_get_cache_entry_list(code):
            if not entry.code.co_freevars and entry.guard_manager.check(f_locals):
                return functools.partial(types.FunctionType(entry.code, fn.__globals__), model)
    except (ImportError, AttributeError, TypeError, RuntimeError):
        pass
    return None


# Building a step function: one at a time
_BUILDING = threading.Lock()


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
