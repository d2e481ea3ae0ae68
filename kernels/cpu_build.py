"""The CPU kernels' build and dispatch (`edge_dlm.kernels.cpu_build`): which library this process runs
(a variant built with the package, `kernels/lib/`, picked by what the CPU reports, or a build for this
machine at first use), the torch operators that call it (`edge_dlm::x16_gemm`, `bf16_gemm`, `attend`:
C++ built against torch's headers, or ctypes calls where none could be built), and why a build failed.
The kernels themselves are C (`csrc/`: a file per family, `commands.KERNEL_SOURCES`; entry points in
`csrc/cpu_kernels.h`); the layers
that use them are `cpu_matmul`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from edge_dlm.kernels import commands, cpu_ctypes

# The kernels' sources (`csrc/`), read as files: compiled, read and linted as C and C++
CSRC = Path(__file__).parent / "csrc"
# the kernel families and their headers as read: what a first-use build compiles and its key covers
SOURCES = {name: (CSRC / name).read_text() for name in (*commands.KERNEL_SOURCES, *commands.KERNEL_HEADERS)}
FLAGS = ["-march=native"]  # a build at first use: for this machine (`commands.kernels`)
# The builds made with the package (setup.py): one per instruction set of `VARIANTS` (csrc/variants.json),
# `cpu_kernels-NAME.so`, and the operators for the torch it was built against, each with its checksum
LIB = Path(__file__).parent / "lib"
VARIANTS = json.loads((CSRC / "variants.json").read_text())
VARIANT_ENV = "EDGE_DLM_CPU_VARIANT"  # a variant's name forces it; "native": build for this machine


def arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The instruction-set features this CPU reports (Linux: /proc/cpuinfo's flags / Features; macOS on
    ARM: the dot product, int8 matrix multiply and bf16 from sysctl), named as `VARIANTS` names them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
        return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", *DARWIN_FEATURES], capture_output=True, text=True)
        except OSError:
            return frozenset()
        return darwin_features(out.stdout)
    return frozenset()


# macOS names the ARM features in sysctl (`hw.optional.arm.FEAT_*: 1`); /proc/cpuinfo's names for them
DARWIN_FEATURES = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm",
                   "hw.optional.arm.FEAT_BF16": "bf16"}


def darwin_features(text: str) -> frozenset[str]:
    """The features `sysctl NAME...` printed as set (a name this macOS does not know is left out)."""
    have = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}
    return frozenset(name for key, name in DARWIN_FEATURES.items() if have.get(key) == "1")


def _built_from(*sources: str) -> bool:
    """Whether the libraries built with the package were built from today's `csrc/` files `sources` (a
    source checkout edited since its install builds at first use instead)."""
    try:
        recorded = json.loads((LIB / "sources.json").read_text())
        return all(recorded.get(s) == hashlib.sha256((CSRC / s).read_bytes()).hexdigest() for s in sources)
    except (OSError, ValueError, AttributeError):
        return False


def installed() -> list[dict]:
    """The variants built with the package for this architecture, best first."""
    if not _built_from(*SOURCES):
        return []
    return [v for v in VARIANTS.get(arch(), []) if (LIB / f"cpu_kernels-{v['name']}.so").is_file()]


def pick() -> tuple[dict | None, str]:
    """The built variant this process loads and why; (None, why) where the kernels are built for this
    machine at first use instead. `$EDGE_DLM_CPU_VARIANT` forces a variant (one this CPU cannot run, or
    one not built, is a one-line error) or `native`."""
    from edge_dlm.primitives.errors import UserError

    have, built = cpu_features(), installed()
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    if forced:
        names = [v["name"] for v in VARIANTS.get(arch(), [])]
        if forced == "native":
            return None, f"{VARIANT_ENV}=native"
        v = next((v for v in VARIANTS.get(arch(), []) if v["name"] == forced), None)
        if v is None:
            raise UserError(f"{VARIANT_ENV}={forced[:20]!r} is not a kernel variant of {arch()}; known: "
                            f"{', '.join(names + ['native'])}")
        if missing := sorted(set(v["cpu"]) - have):
            raise UserError(f"{VARIANT_ENV}={forced}: this CPU lacks {', '.join(missing)}; unset it or pick another")
        if v not in built:
            raise UserError(f"{VARIANT_ENV}={forced}: not built with this install ({LIB}); reinstall edge-dlm "
                            "where a C compiler is present, or unset it")
        return v, f"forced by {VARIANT_ENV}"
    for v in built:
        if set(v["cpu"]) <= have:
            return v, f"the best of the {len(built)} built with the package that this CPU runs, made for {v['cpus']}"
    if not built:
        return None, ("none were built with the package from today's source (a source checkout, an edited "
                      "one, or no compiler when installed)")
    return None, f"none of the {len(built)} built with the package runs on this CPU"


def _cpu_key() -> str:
    """A first-use build depends on the sources, the flags and this CPU's instruction set (-march=native)."""
    parts = [*SOURCES.values(), " ".join(commands.kernels("cc", FLAGS, list(commands.KERNEL_SOURCES), "")),
             platform.machine(), *sorted(cpu_features())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _verified(path: Path) -> bool:
    """Whether `path` is the library built (its checksum, recorded at build, matches)."""
    try:
        return (path.parent / (path.name + ".sha256")).read_text().strip() == _digest(path)
    except OSError:
        return False


def available() -> list[str]:
    """Why the CPU kernels cannot run here (empty: a built variant loads, or a compiler builds them)."""
    if pick()[0] is None and not (shutil.which("cc") or shutil.which("gcc")):
        return ["no kernels built with the package for this CPU and no C compiler (cc) to build them"]
    return []


class BuildError(Exception):
    """A kernel build that failed; `str()` is the compiler's last lines."""


def _log(line: str) -> None:
    import sys

    print(f"edge-dlm: {line}", file=sys.stderr, flush=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(out: Path) -> bool:
    """Whether the library `out` is there and is the one built (its checksum, `out.sha256`, recorded at
    build). One cut short (a full disk, a sync tool) would crash the process with SIGBUS when loaded,
    one overwritten would fail to load: either is moved aside (`.bad`) with one line, to be rebuilt."""
    if not out.exists():
        return False
    try:
        if out.is_file() and (out.parent / (out.name + ".sha256")).read_text().strip() == _digest(out):
            return True
    except OSError:
        pass
    try:
        os.replace(out, out.parent / (out.name + ".bad"))
        _log(f"set aside a damaged or unverified kernel library ({out}); rebuilding it")
    except OSError as exc:
        raise BuildError(f"{out} is damaged and cannot be moved aside ({exc.strerror}); delete it") from None
    return False


def _compile(files: dict[str, str], out: Path, command) -> Path:
    """`command(folder, so)` (a compiler's argument list) on `files` (name: text, written into `folder`)
    into `out`, renamed into place when complete with its checksum beside it, unless an intact `out` is
    there; returns the library's path.

    Under a file lock (two processes build once); one line on a terminal's stderr while it builds; a failed build
    raises `BuildError` with the compiler's message. A cache folder that cannot be written (read-only,
    full) builds into a temporary folder for this process instead, said once."""
    if _intact(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out.parent / (out.name + ".lock")):
            if _intact(out):
                return out
            _build_into(files, out, command)
        return out
    except OSError as exc:  # the cache cannot take it: this process's own folder
        tmp = Path(tempfile.mkdtemp(prefix="edge-dlm-kernels-")) / out.name
        _log(f"cannot write the kernel cache {out.parent} ({exc.strerror or exc}); building into {tmp.parent} "
             "for this process")
        _build_into(files, tmp, command)
        return tmp


def _build_into(files: dict[str, str], out: Path, command) -> None:
    _log(f"building {out.name} for this machine (once; ~2-10 s) ...")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / "lib.so"
        for name, text in files.items():  # the texts the key was made of, not whatever the files hold now
            (Path(tmp) / name).write_text(text)
        try:
            r = subprocess.run(command(Path(tmp), str(so)), capture_output=True, text=True)
        except OSError as exc:  # the compiler itself could not start
            raise BuildError(f"{command(Path('src'), 'so')[0]}: {exc.strerror or exc}") from None
        if r.returncode != 0:
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-4:]
            raise BuildError(" | ".join(tail)[:600] or f"the compiler exited with {r.returncode}")
        digest = _digest(so)
        (Path(tmp) / "sum").write_text(digest)
        os.replace(so, out)
        os.replace(Path(tmp) / "sum", out.parent / (out.name + ".sha256"))


class _locked:
    """An exclusive lock on `path` (a file lock: other processes wait) where the OS has one."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no lock, the atomic rename still keeps a library whole
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def compile_kernels(out: Path, flags: list[str] = FLAGS) -> Path:
    """Compile the kernels with `flags` into `out` (atomic rename) unless an intact one is there."""
    cc = shutil.which("cc") or shutil.which("gcc")
    return _compile(SOURCES, out, lambda d, so: [*commands.kernels(cc, flags, [str(d / f) for f in commands.KERNEL_SOURCES],
                                                                   str(d)), so])


def build(out: Path, flags: list[str] = FLAGS) -> ctypes.CDLL:
    """`compile_kernels`, then load them."""
    return load(compile_kernels(out, flags))


def load(path: Path) -> ctypes.CDLL:
    """The kernels library at `path` (a built variant or a first-use build), its functions typed."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"{path} does not load ({str(exc)[:200]})") from None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.x16_simd.restype = lib.bf16_simd.restype = i32
    lib.x16_gemm.restype = lib.attend.restype = i32
    for fn in (lib.x16_pack, lib.x16_unpack, lib.edge_set_parallel):
        fn.restype = None
    lib.edge_set_parallel.argtypes = [p]
    lib.x16_gemm.argtypes = [i32, p, i64, i64, p, p, p, i64, i64, p, i32]
    lib.x16_pack.argtypes = lib.x16_unpack.argtypes = [i32, i32, p, i64, i64, p, i32]
    lib.attend.argtypes = [p, i64, i64, i64, i64, p, p, i64, p, i64, i64, ctypes.c_float, p, i32]
    if lib.bf16_simd():  # a build without a vector path has no bf16_gemm (torch's kernels serve)
        lib.bf16_gemm.restype = i32
        lib.bf16_gemm.argtypes = [p, i64, i64, p, i64, p, i32]
    return lib


def simd() -> dict[str, int]:
    """The vector width (bits) each kernel of this machine's build runs at: 512 (AVX-512), 256 (AVX2,
    with AVX-VNNI's dot product where the CPU has it), 128 (ARM's NEON: `sdot` or `smmla` for int8 / int4,
    `bfdot` or float32 for bf16), 0 (portable C; for bf16: not built, torch's kernels serve)."""
    lib = library()
    return {"int8 / int4": lib.x16_simd(), "bf16": lib.bf16_simd()}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The kernels for this machine: the variant built with the package that this CPU runs (`pick`),
    else built once into the edge-dlm cache (a source checkout; needs a C compiler)."""
    v, why = pick()
    path = None if v is None else LIB / f"cpu_kernels-{v['name']}.so"
    if path is not None and not _verified(path):
        _log(f"{path} does not match the checksum recorded when it was built; building for this machine instead")
        path, why = None, f"the built {v['name']} library is damaged"
    if path is None:
        lib = build(cache_root_kernels() / f"cpu_matmul-{_cpu_key()}.so")
        _BOUND.variant = ("native", f"built at first use with -march=native: {why}")
    else:
        lib = load(path)
        _BOUND.variant = (v["name"], why)
    _register(lib)
    return lib


def cache_root_kernels() -> Path:
    """Where first-use builds go: the edge-dlm cache's `kernels` folder."""
    from edge_dlm.primitives.fsutil import cache_root

    return cache_root() / "kernels"


def variant() -> tuple[str, str]:
    """(name, why) of the kernels this process runs: a variant built with the package, or `native`."""
    library()
    return _BOUND.variant


def threads() -> str:
    """Whose threads the kernels' ranges run on: torch's (ATen's parallel_for, installed by the C++ operators
    built with torch's OpenMP), else the kernels' own, started per call (slower where torch's threads are
    still spinning between its own operations: 1.1-2.3x on 2 threads, scripts/bench_kernel_threads.py)."""
    library()
    if _BOUND.cpp is not None and _BOUND.cpp.edge_dlm_parallel():
        return "torch's threads"
    why = "no C++ operators" if _BOUND.cpp is None else "operators built without torch's OpenMP"
    return f"threads of their own per call ({why})"


# The kernels as torch operators, so a compiled pass keeps them in its graph. Their CPU implementation is
# a few lines of C++ (`OPS_SOURCE`, built once per torch version against torch's own headers) that call the
# C kernels through pointers (`bind`): a compiled pass calls an operator from C++, and a Python
# implementation cost ~3 us more per call than the C++ one (a quantized demo-model AR step made 29 calls:
# 341 -> 240 us). Where no C++ compiler builds it, `cpu_ctypes`' implementations serve.
_OPS = torch.library.Library("edge_dlm", "FRAGMENT")
_OPS.define("x16_gemm(Tensor x, Tensor weight, Tensor scales, Tensor? zeros, int bits, int group, int n) -> Tensor")
_OPS.define("bf16_gemm(Tensor x, Tensor weight, bool bf16_out=False) -> Tensor")
_OPS.define("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor length, float scale) -> Tensor")
# The small operations of a layer (kernels/csrc/pointwise.c, `rope_attend` in attend.c): C++ only (through ctypes
# a call would cost about what the torch operations it stands for cost), for eager passes (`cpu_matmul.build`).
_OPS.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_OPS.define("silu_mul(Tensor gate, Tensor up) -> Tensor")
_OPS.define("rope_attend(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor qscale, Tensor(a!) k_cache, "
            "Tensor(b!) v_cache, int layer, Tensor mask, Tensor length, float scale) -> Tensor")

OPS_SOURCE = (CSRC / "cpu_ops.cpp").read_text()


class _Bound:
    cpp: ctypes.CDLL | None = None  # the C++ operators' library; None: the ctypes implementations serve
    variant: tuple[str, str] = ("", "")  # `variant()`
    ops_origin: str = ""  # where the operators came from (built with the package, or here)


_BOUND = _Bound()


def cpp_operators() -> bool:
    """Whether the operators are the C++ ones (`library()` builds them where a C++ compiler is present)."""
    return _BOUND.cpp is not None


def torch_tag() -> str:
    """The torch build operators are made for (setup.py names the ones it builds the same way)."""
    return "".join(c if c.isalnum() or c == "." else "_" for c in torch.__version__) + \
        f"-abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def _ops_library() -> ctypes.CDLL | None:
    """The C++ operators: those built with the package for this torch, else built once per torch version
    into the edge-dlm cache; registered. None where neither is possible (then the ctypes
    implementations are registered)."""
    shipped = LIB / f"cpu_ops-{torch_tag()}.so"
    if _built_from("cpu_ops.cpp", "cpu_kernels.h") and _verified(shipped):
        out, _BOUND.ops_origin = shipped, "built with the package"
    else:
        cxx = shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            return None
        files = {"cpu_ops.cpp": OPS_SOURCE, "cpu_kernels.h": SOURCES["cpu_kernels.h"]}
        command = commands.operators(cxx, torch, "SOURCE", "INCLUDE")
        key = hashlib.sha256("\n".join([*files.values(), torch.__version__, *command]).encode()).hexdigest()[:16]
        out = cache_root_kernels() / f"cpu_ops-{key}.so"
        try:
            out = _compile(files, out, lambda d, so: [*commands.operators(cxx, torch, str(d / "cpu_ops.cpp"), str(d)), so])
        except BuildError as exc:
            _FAILED["operators"] = str(exc)
            return None
        _BOUND.ops_origin = "built here at first use"
    torch.ops.load_library(str(out))
    return ctypes.CDLL(str(out))


def bind(lib: ctypes.CDLL) -> None:
    """Point the `edge_dlm::*` operators at `lib`'s kernels (`library()` binds this
    machine's build; `scripts/bench_cpu_matmul.py` binds others)."""
    cpu_ctypes.kernels = lib
    if _BOUND.cpp is not None:
        addr = (lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p) if hasattr(lib, name) else None)
        _BOUND.cpp.edge_dlm_bind(*(addr(n) for n in ("x16_gemm", "bf16_gemm", "attend", "rms_norm", "silu_mul",
                                                      "rope_attend")))
        # the kernels' ranges on torch's threads (ATen's parallel_for) where the operators could be built so
        lib.edge_set_parallel(_BOUND.cpp.edge_dlm_parallel())


def _register(lib: ctypes.CDLL) -> None:
    ops = _ops_library()
    if ops is None:
        _OPS.impl("x16_gemm", cpu_ctypes.x16_gemm, "CPU")
        _OPS.impl("bf16_gemm", cpu_ctypes.bf16_gemm, "CPU")
        _OPS.impl("attend", cpu_ctypes.attend, "CPU")
    else:
        ops.edge_dlm_bind.argtypes = [ctypes.c_void_p] * 6
        ops.edge_dlm_bind.restype = None
        ops.edge_dlm_parallel.restype = ctypes.c_void_p
        _BOUND.cpp = ops
    bind(lib)


@torch.library.register_fake("edge_dlm::x16_gemm")
def _(x, weight, scales, zeros, bits, group, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@torch.library.register_fake("edge_dlm::bf16_gemm")
def _(x, weight, bf16_out=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)


@torch.library.register_fake("edge_dlm::attend")
def _(q, k, v, mask, length, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("edge_dlm::rms_norm")
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("edge_dlm::silu_mul")
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("edge_dlm::rope_attend")
def _(q, k, v, cos, sin, qscale, k_cache, v_cache, layer, mask, length, scale):
    return q.new_empty(q.shape)


x16_gemm = torch.ops.edge_dlm.x16_gemm.default
attend = torch.ops.edge_dlm.attend.default
bf16_gemm = torch.ops.edge_dlm.bf16_gemm.default
rms_norm = torch.ops.edge_dlm.rms_norm.default
silu_mul = torch.ops.edge_dlm.silu_mul.default
rope_attend = torch.ops.edge_dlm.rope_attend.default


# Why this process's build failed, by part ("kernels", "operators"): remembered, never retried per
# call; `failure()` and `edge-dlm doctor` show the compiler's message
_FAILED: dict[str, str] = {}


def usable() -> bool:
    """Whether the kernels are built (or build now) and load here (else the references serve). A failed
    build is said once, with the compiler's message, and not tried again in this process."""
    if available() or "kernels" in _FAILED:
        return False
    try:
        library()
    except BuildError as exc:
        _FAILED["kernels"] = str(exc)
        _log(f"the CPU kernels did not build ({str(exc)[:300]}); the slower reference matmuls serve "
             "(`edge-dlm doctor` shows the message)")
        return False
    return True


def failure() -> str | None:
    """Why the kernels (or their C++ operators) did not build in this process: the compiler's message."""
    return _FAILED.get("kernels") or _FAILED.get("operators")
