"""Compiled step functions: `NLDModel.cached_pass` under torch.compile, once per pass shape and bucket.

A cached pass is already static: its shapes depend on (T, pattern, window bucket, LoRA, head rows)
and the cache's shape only; the committed length, the positions and the rows are device tensors
(`edge_dlm.primitives.cache`). So `torch.compile(fullgraph=True, dynamic=False)` traces it without a
graph break or a host synchronization, which is exactly what a CUDA graph needs: on the CPU the step
functions run as inductor's C++ kernels, on CUDA as CUDA graphs (`mode="reduce-overhead"`). A pass of
a new shape compiles once; the decoders bound those shapes (`nld.segments`, the cache's buckets), so a
chat compiles a handful of graphs and then never again.

Compiling is paid once per machine: a model loaded by `edge_dlm.runtime.load` keeps each pass
shape's compiled step function in a store under the edge-dlm cache folder (torch's precompiled
functions: dynamo's transformed code, its guards and inductor's kernels, `StepFunctions.store`), so a
new process loads them (~0.05 s a shape, after torch's compiler modules are imported once) and never
re-traces; a shape the store lacks runs eagerly until it is compiled.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
import weakref
from pathlib import Path

import torch

from edge_dlm.model.store import read_stored
from edge_dlm.primitives.errors import UserError

CHOICES = ("auto", "on", "off")
# The most pass shapes one model compiles (`StepFunctions`); later new shapes run eagerly. The decoders
# bound the shapes a model meets (`nld.segments` cuts every pass into a few widths, the cache comes in
# buckets, `edge_dlm.primitives.cache`): a chat or a server over every mode, block size 1-16 and step
# budget meets a few dozen (`tests/test_compiled_server.py` counts them). $EDGE_DLM_COMPILE_SHAPES sets it.
MAX_SHAPES = 96
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


def enable(model: torch.nn.Module, root: Path | None = None, background: bool = False,
           store: Path | None = None) -> None:
    """Route `model`'s cached passes through compiled step functions (compiled per shape, `StepFunctions`).

    On the CPU: inductor's tuned kernels (`max_autotune`) and its C++ wrapper (no Python between
    kernels): on the demo model an AR step takes 0.28 ms that way against 0.39 ms with the defaults
    and 0.76 ms eager (a 2-core EPYC, one thread). Frozen weights were faster still but inductor does
    not cache frozen graphs: a second process compiled for 25 s and a new window bucket for 85 s, so
    they stay off. Float32 projections of narrow passes become inductor reductions (`RowsLinear`), and
    a pass shape's graph, once built, is called without dynamo's guard check. On CUDA: CUDA graphs
    (`reduce-overhead`). The settings travel with each compile (`options`), not through the global
    config: torch's config is per thread, and a server decodes on its request threads.

    `background`: a pass shape met for the first time runs eagerly and a thread compiles it between
    requests (`StepFunctions.serving`; a server, a chat, the Python API: no request waits for a compile);
    else it compiles there and then.
    `store`: the folder of this model's saved step functions (`StepFunctions.store`; the runtime's
    loader names one per model, precision, machine, torch and edge-dlm version). CPU only: CUDA graphs
    are captured per process (a new process on a GPU re-traces; owed to a GPU measurement).
    """
    if root is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    cuda = any(p.is_cuda for p in model.parameters())
    if cuda:
        settings = dict(mode="reduce-overhead")
    else:
        settings = dict(options={"max_autotune": True, "triton.cudagraphs": False, "cpp_wrapper": True,
                                 "fx_graph_cache": True})
        from edge_dlm.model.layers import replace_linears

        head = getattr(model, "diffusion_head", None)  # its logits feed several reductions (`greedy`):
        # as a reduction inductor would recompute it for each one
        replace_linears(model, lambda m: m is not head and m.weight.dtype == torch.float32, RowsLinear)
    from edge_dlm.model.quant import prepare_layouts

    prepare_layouts(model)  # kernel layouts of quantized weights, built before the trace
    model.step = StepFunctions(model, settings, direct=not cuda, background=background,
                               store=None if cuda else store)
    model.compiled = True


def shape_limit() -> int:
    """`MAX_SHAPES`, or $EDGE_DLM_COMPILE_SHAPES (a bad value: the default, said once)."""
    raw = os.environ.get("EDGE_DLM_COMPILE_SHAPES")
    if raw is None:
        return MAX_SHAPES
    if raw.strip().isdigit():
        return int(raw)
    _log(f"EDGE_DLM_COMPILE_SHAPES={raw[:20]!r} is not a whole number; using {MAX_SHAPES}")
    return MAX_SHAPES


def _log(line: str) -> None:
    import sys

    print(f"edge-dlm: {line}", file=sys.stderr, flush=True)


class StepFunctions:
    """A model's compiled step functions: one graph per pass shape and bucket (`key`), never a failed pass.

    Each key compiles its own copy of `cached_pass` (a fresh code object): dynamo keeps its graphs per
    code object and gives up on one after 8 (`recompile_limit`, an error under `fullgraph`), so one
    shared function failed every pass once a server had met 8 shapes. One graph per function never
    meets that limit, and no limit is raised. At most `shape_limit()` keys compile; later new keys
    run eagerly (one log line). Whatever compiling or a compiled call raises (dynamo, inductor, the C++
    compiler, a full disk under the cache), that key runs eagerly for the life of the process, with one
    log line: the eager pass is the same function uncompiled, held equal to the compiled one by the
    tests, and a pass writes only its own pending K/V slots, so running it again is safe.

    Through `torch.compile` alone, every pass first evaluates all of dynamo's guards (each weight's
    dtype, shape and strides, the pattern's fields, ...): 30-60 us per call on the CPU, a fifth of a
    demo-model AR step. But a pass's graph is named by its key, and that is all that tells the graphs
    apart. So on the CPU a key's graph, once built, is called directly (`direct`), its guards checked
    once: the key holds everything they read that can change while a model runs (the shapes, the
    pattern, the global modes and the thread count); the weights are the model's own and are not
    swapped under a compiled model (`disable` first). On CUDA every pass runs through `torch.compile`:
    its CUDA graphs are managed by its own runtime, and a guard check is small beside a GPU pass.

    With a `store` (a folder), each key compiles ahead of time (`torch.compile(...).aot_compile`: the
    same trace, kept as dynamo's code, guards and inductor's kernels) and is saved there, named by the
    key; a key met again in a new process is loaded from it instead of compiled, its guards checked
    once against the pass's inputs (any failure to load or to match: the file is set aside, the key
    compiles anew). Ahead-of-time compiling costs about twice a plain compile (6.1 vs 3.1 s for a demo
    prefill shape here), so models with no store (built in memory: tests, `bench --shape`) compile the
    plain way and keep nothing.

    With `background`, a new key's first passes run eagerly while one daemon thread per model compiles
    the queued keys in turn, on copies of the pass's inputs (a zeroed cache of the same shape: the real
    one is the request's); a model that is dropped stops its queue."""

    def __init__(self, model: torch.nn.Module, settings: dict, direct: bool, background: bool = False,
                 store: Path | None = None) -> None:
        self.model, self.settings, self.direct, self.background = model, settings, direct, background
        self.store = Path(store) if store is not None else None
        self.loaded = 0  # keys loaded from the store
        self._looked: set[tuple] = set()  # keys looked for in the store
        self.read: dict[str, object] = {}  # stored functions the worker loaded ahead, by file name
        self._unreadable: set[str] = set()
        self.fns: dict[tuple, object] = {}  # key -> its compiled function
        self.eager: dict[tuple, str] = {}  # key -> why it runs eagerly
        self.pending: dict[tuple, tuple] = {}  # key -> what its background compile needs, in order
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._busy = 0  # requests decoding now (`serving`): background compiles start only between them
        self._idle = threading.Event()
        self._idle.set()
        self._idle_since = time.monotonic()
        self.limit = shape_limit()
        self._said_limit = False
        if background and self._unread() is not None:
            self._start_worker()  # a server or a chat loads its stored functions while it waits

    @property
    def keys(self) -> set[tuple]:
        return set(self.fns)

    def summary(self) -> str:
        """What the server log and doctor say: how many shapes are compiled, compiling, eager."""
        failed = sum(1 for why in self.eager.values() if why != "limit")
        kept = f" ({self.loaded} loaded from {self.store})" if self.store is not None else ""
        return (f"{len(self.fns)} pass shapes compiled{kept}, {len(self.pending)} compiling, "
                f"{len(self.eager) - failed} eager past the {self.limit}-shape bound, {failed} eager after a failed compile")

    def key(self, tokens, k_buf, attn, window, use_lora, last, pick, sample) -> tuple:
        """What a pass's graph depends on (`NLDModel.cached_pass`; the cache's dtype and device follow
        the model's, `new_cache`) and the global state dynamo guards (threads, grad modes, ...)."""
        lora = self.model.encoder.layers[0].self_attn.o_lora is not None  # without a drafter use_lora is unread
        return (tokens.shape, k_buf.shape, attn, window, bool(use_lora) and lora, last is None, pick, sample, lora,
                torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads(),
                torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                torch.is_autocast_enabled("cpu"))

    def __call__(self, tokens, positions, length, k_buf, v_buf, attn, window, use_lora, last, pick=None,
                 sample=None, draw=None):
        args = (tokens, positions, length, k_buf, v_buf, attn, window, use_lora, last, pick, sample, draw)
        key = self.key(tokens, k_buf, attn, window, use_lora, last, pick, sample)
        fn = self.fns.get(key)
        if fn is not None:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 (whatever a compiled call raises: that key runs eagerly)
                self._give_up(key, exc)
                return self.model.cached_pass(*args)
        if key in self.eager or key in self.pending:
            return self.model.cached_pass(*args)
        if self.store is not None and key not in self._looked:
            fn = self._load(key, args)
            if fn is not None:
                return self.model.cached_pass(*args) if fn is _LATER else fn(*args)
        if len(self.fns) + len(self.pending) >= self.limit:
            self.eager[key] = "limit"
            if not self._said_limit:
                self._said_limit = True
                _log(f"compiled {self.limit} pass shapes (the bound, $EDGE_DLM_COMPILE_SHAPES); new shapes run eagerly")
            return self.model.cached_pass(*args)
        if self.background:
            self._compile_later(key, args)
            return self.model.cached_pass(*args)
        with _BUILDING:
            try:
                out = self._build(key, args)
            except Exception as exc:  # noqa: BLE001 (dynamo, inductor, the C++ compiler, the disk: eager)
                self._give_up(key, exc)
                return self.model.cached_pass(*args)
        return out

    def _build(self, key: tuple, args: tuple):
        """Compile `key`'s own copy of the pass and run it on `args`; keep it for the key (and in the
        store, where there is one)."""
        fn = _own_pass(self.model)
        compiled_fn = torch.compile(fn.__func__ if self.store is not None else fn, fullgraph=True, dynamic=False,
                                    **self.settings)
        if self.store is not None:
            ahead = compiled_fn.aot_compile(((self.model, *args), {}))
            call = functools.partial(ahead.fn, self.model)  # guards held by construction (see `_load`)
            out = call(*args)
            self.fns[key] = call
            self._save(key, ahead)
            return out
        out = compiled_fn(*args)
        self.fns[key] = (direct(self.model, fn, args) if self.direct else None) or compiled_fn
        return out

    def _path(self, key: tuple) -> Path:
        import hashlib

        # the grad modes a key's passes run under (in the key too) are in the name: a function is loaded
        # under them (its guards record the dispatch keys a tensor has in that mode)
        modes = ("i" if key[9] else "-") + ("g" if key[10] else "-")
        return self.store / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}{modes}.step"

    def _save(self, key: tuple, ahead) -> None:
        """Keep a key's compiled step function in the store (a full or read-only disk: this process
        keeps it, one line once, `fsutil.write_cache`)."""
        from edge_dlm.primitives.fsutil import write_cache

        try:
            data = type(ahead).serialize(ahead).serialized_data
        except Exception as exc:  # noqa: BLE001 (a torch that cannot serialize it: this process keeps it)
            _log(f"a compiled pass shape could not be saved ({type(exc).__name__}); a new process compiles it again")
            return
        write_cache(self._path(key), data, "compiled step functions")

    def _read(self, path: Path):
        """A stored step function (hold `_BUILDING`): the one the worker read ahead, else read now."""
        ahead = self.read.pop(path.name, None)
        return ahead if ahead is not None else read_stored(path)

    def _load(self, key: tuple, args: tuple):
        """`key`'s step function from the store, checked against this pass's inputs (its guards: the
        weights' shapes and dtypes, the pattern, the cache, inference tensors or not); None where it is
        not kept; `_LATER` where a compile holds torch's compiler now (this pass runs eagerly, a later
        one loads it). A file that fails to load or to match is set aside and the key compiles anew."""
        path = self._path(key)
        if not path.is_file():
            self._looked.add(key)
            return None
        if not _BUILDING.acquire(blocking=False):
            return _LATER
        self._looked.add(key)
        try:
            ahead = self._read(path)
            if not ahead.guard_check(self.model, *args):
                f_locals = ahead.prepare_f_locals(self.model, *args)
                failed = ahead._artifacts.guard_manager.check_verbose(f_locals).verbose_code_parts
                raise ValueError(f"its guards do not hold for this model's pass: {'; '.join(failed)}")
            call = functools.partial(ahead.fn, self.model)
            self.fns[key] = call
            self.loaded += 1
            return call
        except Exception as exc:  # noqa: BLE001 (a damaged, stale or foreign file: compile anew)
            from edge_dlm.primitives.fsutil import set_aside

            first = (str(exc).strip().splitlines() or [""])[0][:160]
            set_aside(path, f"a compiled step function that does not load here: {type(exc).__name__}: {first}")
            return None
        finally:
            _BUILDING.release()

    def _unread(self) -> Path | None:
        """A stored step function not yet loaded (the background worker reads them ahead, while idle)."""
        if self.store is None or not self.store.is_dir():
            return None
        done = {self._path(k).name for k in self.fns} | set(self.read) | self._unreadable
        return next((f for f in sorted(self.store.glob("*.step")) if f.name not in done), None)

    def _give_up(self, key: tuple, exc: BaseException) -> None:
        self.fns.pop(key, None)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        self.eager[key] = f"{type(exc).__name__}: {first}"
        _log(f"compiling a pass shape failed ({type(exc).__name__}: {first}); that shape runs eagerly from now on")

    def _compile_later(self, key: tuple, args: tuple) -> None:
        """Queue `key` for the one background worker of this model (started when needed). The queue
        keeps the pass's small inputs and only the cache's shape (a zeroed cache is made when the key's
        turn comes); the worker holds the model weakly, so a model that is dropped stops compiling."""
        item = (tuple(_spec(a) for a in args), torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        with self._lock:
            self.pending[key] = item
        self._start_worker()

    def _start_worker(self) -> None:
        # torch's compiler imported here, on the caller's thread, before the worker uses it: imported on two
        # threads at once (the worker reading a stored function, the caller importing a library that touches
        # torch._dynamo, such as transformers), a half-initialised module failed the other's import
        import torch._dynamo  # noqa: F401
        import torch._inductor.config  # noqa: F401

        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=_work, args=(weakref.ref(self),), name="edge-dlm-compile",
                                                daemon=True)
                self._worker.start()

    @contextlib.contextmanager
    def serving(self):
        """Around a request: a background compile starts only while no request decodes (dynamo traces
        in Python: beside a decode it took the GIL from the eager passes, 8x slower on the demo model),
        so a one-shot command never compiles and a server or a chat compiles between requests."""
        with self._lock:
            self._busy += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle_since = time.monotonic()
                    self._idle.set()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the background compiles queued so far are done (calibration, tests)."""
        while True:
            with self._lock:
                worker = self._worker
            if worker is None or not worker.is_alive():  # done, or stopped (exit, a dropped model)
                return
            worker.join(timeout)
            if timeout is not None:
                return


def _work(ref) -> None:
    """A model's background compiles, one key at a time, while the model lives; with none queued, its
    stored step functions loaded ahead of their first pass."""
    while True:
        sf = ref()
        if sf is None:
            return
        idle = sf._idle
        del sf
        idle.wait(1.0)  # between requests (`serving`); the model is held only while building
        if _EXITING.is_set():
            return
        sf = ref()
        if sf is None:
            return
        quiet = time.monotonic() - sf._idle_since
        if not sf._idle.is_set() or quiet < IDLE_S:
            del sf
            time.sleep(max(IDLE_S - quiet, 0.05))
            continue
        with sf._lock:
            item = next(iter(sf.pending.items()), None)
        if item is None:  # nothing to compile: load a stored function ahead of its first pass
            path = sf._unread()
            if path is None:
                with sf._lock:
                    if not sf.pending:
                        sf._worker = None
                        return
                del sf
                continue
            with _BUILDING:
                if _EXITING.is_set():
                    return
                try:
                    sf.read[path.name] = sf._read(path)
                except Exception as exc:  # noqa: BLE001 (damaged: set aside; its key compiles anew when met)
                    from edge_dlm.primitives.fsutil import set_aside

                    sf._unreadable.add(path.name)
                    set_aside(path, f"a compiled step function that does not load here: {type(exc).__name__}")
            del sf
            continue
        key, (spec, inference, grad) = item
        try:
            args = tuple(_made(a) for a in spec)
            with _BUILDING, torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if _EXITING.is_set():
                    return
                sf._build(key, args)
        except Exception as exc:  # noqa: BLE001 (as in __call__: the key runs eagerly)
            sf._give_up(key, exc)
        finally:
            with sf._lock:
                sf.pending.pop(key, None)
        del sf


def _spec(a):
    """A pass input kept for a background compile: small tensors copied, a cache (4-d) as its shape;
    each as an inference tensor or not, as it was (a compiled function's guards tell them apart, and
    the stored one must match the passes of a later process)."""
    if torch.is_tensor(a):
        if a.dim() >= 4:
            return ("zeros", tuple(a.shape), a.dtype, a.device, a.is_inference())
        with torch.inference_mode(a.is_inference()):
            return a.clone()
    return a


def _made(a):
    if isinstance(a, tuple) and a and a[0] == "zeros":
        with torch.inference_mode(a[4]):
            return torch.zeros(a[1], dtype=a[2], device=a[3])
    return a


def _own_pass(model: torch.nn.Module):
    """`model.cached_pass` as a function of its own: the same code in a new code object, so dynamo keeps
    this function's one graph apart from every other key's."""
    import types

    f = type(model).cached_pass
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, model)


def direct(model: torch.nn.Module, fn, args: tuple):
    """The code dynamo built for `fn(*args)` (`fn`: `_own_pass(model)`, run once through
    `torch.compile`), as a function to call without its guard check. None where this torch keeps its
    entries otherwise (then passes stay guarded)."""
    import types

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        code = fn.__func__.__code__
        f_locals = dict(zip(code.co_varnames[:code.co_argcount], (model, *args)))
        for entry in _debug_get_cache_entry_list(code):
            if not entry.code.co_freevars and entry.guard_manager.check(f_locals):
                return functools.partial(types.FunctionType(entry.code, fn.__func__.__globals__), model)
    except (ImportError, AttributeError, TypeError, RuntimeError):
        pass
    return None


# Building a step function: one at a time, and never beside another dynamo trace of this process (an
# ONNX export takes it too, `exclusive`: two traces at once corrupted each other's state)
_BUILDING = threading.RLock()
_EXITING = threading.Event()
_LATER = object()  # `StepFunctions._load`: kept, but torch's compiler is busy now
IDLE_S = 2.0  # a model idle this long may compile in the background: a one-shot command has exited


def exclusive():
    """Hold this around any other dynamo trace in the process (`torch.export`, the ONNX exporter)."""
    return _BUILDING


def _at_exit() -> None:
    """At interpreter exit: no new background compile, and one in flight finishes first (a process that
    ended beside inductor's threads aborted: "terminate called without an active exception")."""
    _EXITING.set()
    if _BUILDING.acquire(timeout=300):
        _BUILDING.release()


atexit.register(_at_exit)


def disable(model: torch.nn.Module) -> None:
    """Eager passes again; background compiles not yet started are dropped."""
    step = getattr(model, "step", None)
    if isinstance(step, StepFunctions):
        with step._lock:
            step.pending.clear()
    model.step = model.cached_pass
    model.compiled = False
