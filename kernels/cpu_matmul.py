"""CPU matmuls for the passes of a decode: int8 / int4 (`x16_gemm`, for `QuantLinear`) and bfloat16
(`bf16_gemm`, for `Bf16Linear`; projections that share an input as one call: `fuse`), and the attention
of narrow passes (`attend`), a page of C compiled once per machine with the system compiler
(`-O3 -march=native`, OpenMP over output rows) into the edge-dlm cache folder and called through torch
operators written in C++ (`OPS_SOURCE`), so a compiled pass (`--compile on`) keeps them in its graph.

Why our own: torch has no group-wise int8 CPU kernel (the reference dequantized every weight on every
pass: 0.03x llama.cpp's Q8_0 decode at the NLD-3B shape), its int4 kernel's cost grows with every row
of a pass, and its bf16 matrix-vector product reads ~18 GB/s on a Zen 4 core where memory gives ~30-40.

    int8 / int4 (x16_gemm):  x rounded to int8 per block of 32 columns (d = max|x| / 127, as
        llama.cpp does for its Q8_0 / Q4_0 dot products), weights held in the kernel's layout built at
        load (`x16_layout`: 16 output rows side by side, 2 MiB pages), one AVX512-VNNI unsigned x signed
        dot product serving 16 rows at once; scales applied per block of 32 in float32;
    bf16 (bf16_gemm):  x . w in bf16 pairs (AVX512-BF16), float32 sums;
    wide bf16 passes:  past `MAX_ROWS` rows on AVX512-BF16, torch's bf16 GEMM (`max_rows`; int8 / int4
        passes of every width stay on `x16_gemm`).

Each output (m, n) is computed by the same operations whatever the pass width M and whichever rows
share a register tile, so a row's result never depends on how many rows the pass has (LinearSpec's
verify pass and AR's step agree bit for bit); output rows are split over threads, never a sum. CPUs
without AVX-512 (Intel laptops and desktops from Skylake to today's, AMD before Zen 4) build 256-bit
paths of the same arithmetic: AVX-VNNI's dot product where the CPU has it (Alder Lake and later), else
AVX2's byte-pair sums, exact (the int8 / int4 results are bit for bit the AVX-512 build's), and bf16
widened to float32 with fused multiply-adds. Other CPUs (ARM) build portable C loops for int8 / int4
and leave bf16 to torch (`simd()` says which; `edge-dlm doctor` prints it;
`tests/kernels/test_cpu_matmul.py` builds each variant this CPU can run and checks it). Without a C
compiler none is used and the references serve.

The int8 / int4 layout stands in for the stored `qweight` / `scales` / `zeros` (`QuantLinear.derived`
drops them once `x16_stored` rebuilds them exactly from it, and rebuilds them for whatever reads them
later: export, `state_dict`, the reference), so a quantized model holds its weights once.
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

# The kernels' sources (`csrc/`), read as files: compiled, read and linted as C and C++
CSRC = Path(__file__).parent / "csrc"
SOURCE = (CSRC / "cpu_kernels.c").read_text()
# no -ffast-math: the order above is kept; -I: the shared header (cpu_kernels.h), as the source is built from a copy
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-I{CSRC}"]
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
    ARM: the dot product from sysctl), named as `VARIANTS` names them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
        return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True)
            return frozenset({"asimddp"} if out.stdout.strip() == "1" else ())
        except OSError:
            pass
    return frozenset()


def _built_from(source: str) -> bool:
    """Whether the libraries built with the package were built from today's `csrc/source` (a source
    checkout edited since its install builds at first use instead)."""
    try:
        recorded = json.loads((LIB / "sources.json").read_text()).get(source)
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == hashlib.sha256((CSRC / source).read_bytes()).hexdigest()


def installed() -> list[dict]:
    """The variants built with the package for this architecture, best first."""
    if not _built_from("cpu_kernels.c"):
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
    """A first-use build depends on the source, the flags and this CPU's instruction set (-march=native)."""
    return hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), platform.machine(), " ".join(sorted(cpu_features()))])
                          .encode()).hexdigest()[:16]


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


def _compile(source: str, suffix: str, out: Path, command) -> Path:
    """`command(src, so)` (a compiler's argument list) on `source` into `out`, renamed into place when
    complete with its checksum beside it, unless an intact `out` is there; returns the library's path.

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
            _build_into(source, suffix, out, command)
        return out
    except OSError as exc:  # the cache cannot take it: this process's own folder
        tmp = Path(tempfile.mkdtemp(prefix="edge-dlm-kernels-")) / out.name
        _log(f"cannot write the kernel cache {out.parent} ({exc.strerror or exc}); building into {tmp.parent} "
             "for this process")
        _build_into(source, suffix, tmp, command)
        return tmp


def _build_into(source: str, suffix: str, out: Path, command) -> None:
    import sys

    _log(f"building {out.name} for this machine (once; ~2-10 s) ...")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / f"source{suffix}", Path(tmp) / "lib.so"
        src.write_text(source)
        try:
            r = subprocess.run(command(str(src), str(so)), capture_output=True, text=True)
        except OSError as exc:  # the compiler itself could not start
            raise BuildError(f"{command('src', 'so')[0]}: {exc.strerror or exc}") from None
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


def build(out: Path, flags: list[str] = FLAGS) -> ctypes.CDLL:
    """Compile the kernels with `flags` into `out` (atomic rename) unless it is there; load them."""
    cc = shutil.which("cc") or shutil.which("gcc")
    return load(_compile(SOURCE, ".c", out, lambda src, so: [cc, *flags, src, "-o", so, "-lm"]))


def load(path: Path) -> ctypes.CDLL:
    """The kernels library at `path` (a built variant or a first-use build), its functions typed."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"{path} does not load ({str(exc)[:200]})") from None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.x16_simd.restype = lib.bf16_simd.restype = i32
    lib.x16_gemm.restype = lib.attend.restype = i32
    for fn in (lib.x16_pack, lib.x16_unpack):
        fn.restype = None
    lib.x16_gemm.argtypes = [i32, p, i64, i64, p, p, p, i64, i64, p, i32]
    lib.x16_pack.argtypes = lib.x16_unpack.argtypes = [i32, i32, p, i64, i64, p, i32]
    lib.attend.argtypes = [p, i64, i64, i64, i64, p, p, i64, p, i64, i64, ctypes.c_float, p, i32]
    if lib.bf16_simd():  # a build without a vector path has no bf16_gemm (torch's kernels serve)
        lib.bf16_gemm.restype = i32
        lib.bf16_gemm.argtypes = [p, i64, i64, p, i64, p, i32]
    return lib


def simd() -> dict[str, int]:
    """The vector width (bits) each kernel of this machine's build runs at: 512 (AVX-512), 256 (AVX2,
    with AVX-VNNI's dot product where the CPU has it), 0 (portable C; for bf16: not built)."""
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# The kernels as torch operators, so a compiled pass keeps them in its graph. Their CPU implementation is
# a few lines of C++ (`OPS_SOURCE`, built once per torch version against torch's own headers) that call the
# C kernels through pointers (`bind`): a compiled pass calls an operator from C++, and a Python
# implementation cost ~3 us more per call than the C++ one (a quantized demo-model AR step made 29 calls:
# 341 -> 240 us). Where no C++ compiler builds it, `_x16_gemm` / `_bf16_gemm` / `_attend` (ctypes) serve.
_OPS = torch.library.Library("edge_dlm", "FRAGMENT")
_OPS.define("x16_gemm(Tensor x, Tensor weight, Tensor scales, Tensor? zeros, int bits, int group, int n) -> Tensor")
_OPS.define("bf16_gemm(Tensor x, Tensor weight) -> Tensor")
_OPS.define("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor length, float scale) -> Tensor")

OPS_SOURCE = (CSRC / "cpu_ops.cpp").read_text()


def _x16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group: int, n: int) -> torch.Tensor:
    """`x [M, K]` float32 . W^T -> `[M, n]` float32, W int8 / int4 in the 16-row layout of
    `x16_layout` (`weight`, fp16 `scales` / `zeros`); x rounded to int8 per block of 32 columns."""
    x = x.contiguous()
    m, k = x.shape
    blocks = -(-n // 16)
    _require(x.dtype == torch.float32 and bits in (8, 4) and k % 32 == 0 and group >= 32 and not group & (group - 1)
             and k % group == 0 and weight.dtype == torch.uint8 and weight.numel() == blocks * 16 * k * bits // 8
             and scales.dtype == torch.float16 and scales.numel() == blocks * k // group * 16
             and (zeros is None or zeros.shape == scales.shape) and weight.is_contiguous() and scales.is_contiguous(),
             "x16_gemm takes x [M, K] float32 (K a multiple of 32) and an int8 / int4 16-row layout of n x K")
    y = torch.empty(m, n, dtype=torch.float32)
    _require(m == 0 or _BOUND.kernels.x16_gemm(bits, x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(),
                                               _ptr(zeros), n, group, y.data_ptr(), torch.get_num_threads()) == 0,
             "x16_gemm: out of memory")
    return y


def _require(ok: bool, what: str) -> None:
    """The C++ operators' checks, for the ctypes implementations (`TORCH_CHECK` raises RuntimeError)."""
    if not ok:
        raise RuntimeError(what)


def _bf16_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x [M, K]` bfloat16 . `weight [N, K]` bfloat16^T -> `[M, N]` float32 (sums in float32)."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    _require(x.dtype == weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] == k and k % 32 == 0
             and weight.is_contiguous(), "bf16_gemm takes x [M, K] and weight [N, K] bfloat16, K a multiple of 32")
    y = torch.empty(m, n, dtype=torch.float32)
    _require(m == 0 or _BOUND.kernels.bf16_gemm(x.data_ptr(), m, k, weight.data_ptr(), n, y.data_ptr(),
                                                torch.get_num_threads()) == 0, "bf16_gemm: out of memory")
    return y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, length: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Attention of `q [H, R, D]` over `k` / `v [H, W, D]` (rows contiguous) under `mask [T, W]`, keys
    past `length + T` unseen: the C kernel `attend` (see `attend` below)."""
    q, mask = q.contiguous(), mask.contiguous()
    h, r, d = q.shape
    t, w = mask.shape
    out = torch.empty(q.shape)
    keys = min(w, int(length) + t)
    _require(q.dtype == k.dtype == v.dtype == torch.float32 and k.shape == v.shape and k.stride() == v.stride()
             and k.shape[0] == h and k.shape[2] == d and k.stride(1) == d and k.stride(2) == 1 and d % 16 == 0
             and mask.dtype == torch.bool and mask.shape[1] == k.shape[1] and r % t == 0 and keys >= t,
             "attend takes float32 q [H, R, D], k / v [H, W, D] (rows side by side, D a multiple of 16), mask [T, W]")
    _require(_BOUND.kernels.attend(q.data_ptr(), h, r, t, d, k.data_ptr(), v.data_ptr(), k.stride(0), mask.data_ptr(),
                                   w, keys, scale, out.data_ptr(), torch.get_num_threads()) == 0, "attend: out of memory")
    return out


class _Bound:
    kernels: ctypes.CDLL | None = None  # the kernels library the operators call (`bind`)
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
    if _built_from("cpu_ops.cpp") and _verified(shipped):
        out, _BOUND.ops_origin = shipped, "built with the package"
    else:
        cxx = shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            return None
        root = Path(torch.__file__).parent
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        key = hashlib.sha256("\n".join([OPS_SOURCE, torch.__version__, cxx, str(abi)]).encode()).hexdigest()[:16]
        out = cache_root_kernels() / f"cpu_ops-{key}.so"
        try:
            out = _compile(OPS_SOURCE, ".cpp", out, lambda src, so: [
                cxx, "-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}",
                f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", src, "-o", so,
                f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"])
        except BuildError as exc:
            _FAILED["operators"] = str(exc)
            return None
        _BOUND.ops_origin = "built here at first use"
    torch.ops.load_library(str(out))
    return ctypes.CDLL(str(out))


def bind(lib: ctypes.CDLL) -> None:
    """Point the `edge_dlm::x16_gemm` / `bf16_gemm` / `attend` operators at `lib`'s kernels (`library()` binds this
    machine's build; `scripts/bench_cpu_matmul.py` binds others)."""
    _BOUND.kernels = lib
    if _BOUND.cpp is not None:
        addr = (lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p) if hasattr(lib, name) else None)
        _BOUND.cpp.edge_dlm_bind(addr("x16_gemm"), addr("bf16_gemm"), addr("attend"))


def _register(lib: ctypes.CDLL) -> None:
    ops = _ops_library()
    if ops is None:
        _OPS.impl("x16_gemm", _x16_gemm, "CPU")
        _OPS.impl("bf16_gemm", _bf16_gemm, "CPU")
        _OPS.impl("attend", _attend, "CPU")
    else:
        ops.edge_dlm_bind.argtypes = [ctypes.c_void_p] * 3
        ops.edge_dlm_bind.restype = None
        _BOUND.cpp = ops
    bind(lib)


@torch.library.register_fake("edge_dlm::x16_gemm")
def _(x, weight, scales, zeros, bits, group, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@torch.library.register_fake("edge_dlm::bf16_gemm")
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("edge_dlm::attend")
def _(q, k, v, mask, length, scale):
    return q.new_empty(q.shape)


x16_gemm = torch.ops.edge_dlm.x16_gemm.default
attend = torch.ops.edge_dlm.attend.default


def _huge_pages(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer of `nbytes` backed by transparent huge pages where the kernel
    offers them (madvise before first touch): streaming the weights of a decode step from memory ran
    7-13% faster on 2 MiB pages than on 4 KiB ones (one TLB miss per 2 MiB, prefetchers not stopped
    at every 4 KiB)."""
    huge = 2 << 20
    if nbytes < 4 * huge or platform.system() != "Linux":  # small: not worth a 2 MiB alignment pad
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + huge, dtype=torch.uint8)
    start = (raw.data_ptr() + huge - 1) // huge * huge
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, nbytes // huge * huge, 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    off = start - raw.data_ptr()
    return raw[off:off + nbytes]


def x16_layout(mod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`mod`'s weight in the narrow kernel's layout (`x16_pack` in the C source): rows in blocks of 16
    (the last padded with zeros), per 4 columns (int4: 8) the 16 rows' bytes side by side, as unsigned
    values (signed ones offset by 128 / 8: the kernel subtracts the offset times the activations' sum);
    scales and zero points `[blocks, groups, 16]` fp16. It stands in for `qweight` / `scales` /
    `zeros` (`x16_stored` gives them back). Converted in C at memory speed (in torch, the 3B shape's
    29 weights took 3.4 s of a first answer)."""
    bits, n, k = mod.spec.bits, mod.out_features, mod.in_features
    signed = mod.zeros is None
    blocks = -(-n // 16)
    weight = _huge_pages(blocks * 16 * k * bits // 8).view(blocks, k * bits // 32, 16, 4)
    stored = mod.qweight.contiguous()
    library().x16_pack(bits, int(signed), stored.data_ptr(), n, k, weight.data_ptr(), torch.get_num_threads())

    def rows16(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(blocks * 16, t.shape[1], dtype=torch.float16)
        out[:n] = t
        return out.view(blocks, 16, -1).permute(0, 2, 1).contiguous()
    return weight, rows16(mod.scales), None if signed else rows16(mod.zeros)


def x16_stored(layout, mod, blocks: slice = slice(None)) -> dict[str, torch.Tensor | None]:
    """The inverse of `x16_layout`: `mod`'s `qweight`, `scales` and `zeros` as stored (the rows of the
    16-row `blocks` only, when given)."""
    weight, s16, z16 = (t if t is None else t[blocks] for t in layout)
    bits, k = mod.spec.bits, mod.in_features
    n = min(mod.out_features - 16 * (blocks.start or 0), 16 * weight.shape[0])
    signed = z16 is None
    qweight = torch.empty(n, k * bits // 8, dtype=torch.int8 if signed and bits == 8 else torch.uint8)
    library().x16_unpack(bits, int(signed), weight.data_ptr(), n, k, qweight.data_ptr(), torch.get_num_threads())

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.permute(0, 2, 1).reshape(-1, t.shape[1])[:n].contiguous()
    return {"qweight": qweight, "scales": rows(s16), "zeros": rows(z16)}


bf16_gemm = torch.ops.edge_dlm.bf16_gemm.default


MAX_ROWS = 32  # bf16 with AVX512-BF16: wider passes (prefill chunks, QuadraticSpec's cycle) go to torch's GEMM


@functools.lru_cache(maxsize=1)
def max_rows() -> int:
    """The widest bf16 pass `Bf16Linear` takes: `MAX_ROWS` where torch's bf16 GEMM has AVX512-BF16 (it
    wins past ~32 rows there: 29.5 vs 40.8 ms at 256 x 3072 x 9216), every width on a 256-bit build
    (torch's AVX2 bf16 GEMM was 2.5-2.9x slower than this kernel at every width from 16 to 256 rows)."""
    return MAX_ROWS if library().bf16_simd() == 512 else 1 << 62


class Bf16Linear(torch.nn.Linear):
    """`nn.Linear` with bf16 weights on the CPU: passes up to `max_rows()` rows (set at `enable_bf16`,
    outside any compiled trace) through `bf16_gemm`
    (AVX512-BF16 dot products; torch's bf16 matrix-vector product reads ~18 GB/s on a Zen 4 core),
    wider ones through torch's GEMM. A row's result never depends on the width within either route."""

    max_rows = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.bias is not None or x2.shape[0] > self.max_rows or self.in_features % 32 or x.dtype != torch.bfloat16:
            return super().forward(x)
        return bf16_gemm(x2, self.weight).to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def enable_bf16(model: torch.nn.Module) -> int:
    """Route `model`'s bf16 CPU linears through `Bf16Linear`; returns how many (0 without a compiler or
    without a vector path: a scalar loop would be slower than torch's own bf16 kernels)."""
    if not usable() or not library().bf16_simd():
        return 0
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
            mod.__class__ = Bf16Linear
            mod.max_rows = max_rows()
            if shared[id(mod.weight)] == 1:  # onto 2 MiB pages (a tied weight stays where it is)
                w = _huge_pages(mod.weight.numel() * 2).view(torch.bfloat16).view(mod.weight.shape)
                w.copy_(mod.weight.detach())
                mod.weight = torch.nn.Parameter(w, requires_grad=mod.weight.requires_grad)
            n += 1
    return n




def cpu_quant_matmul(x: torch.Tensor, mod) -> torch.Tensor | None:
    """The `register_matmul("int8" | "int4", "cpu", ...)` entry for the edge-dlm layout: every pass
    through `x16_gemm`, whatever its width (it beat dequantizing to bf16 for torch's GEMM at every width
    measured, up to 512 rows: `scripts/bench_cpu_matmul.py`), so a row's result is the same in every
    pass, QuadraticSpec's widest included."""
    if not _covers(mod):
        return None
    x2 = x.reshape(-1, mod.in_features)
    w, s, z = _layout(mod)
    y = x16_gemm(x2.float(), w, s, z, mod.spec.bits, mod.spec.group_size, mod.out_features)
    return y.to(x.dtype).reshape(*x.shape[:-1], mod.out_features)


def _covers(mod) -> bool:  # act-order columns, odd widths and groups below a block: the reference's
    return mod.perm is None and mod.in_features % 32 == 0 and mod.spec.group_size >= 32


LAYOUT = "cpu-x16"  # the name `QuantLinear.derived` keeps this kernel's layout under


def _layout(mod):
    return mod.derived(LAYOUT, x16_layout, x16_stored)


def _prepare(mod) -> None:
    if _covers(mod):
        _layout(mod)


cpu_quant_matmul.prepare = _prepare


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


def enable_for(model: torch.nn.Module) -> bool:
    """A model about to run on the CPU: its narrow passes' attention (`enable_attention`), its int8 / int4
    matmuls and its bf16 linears through these kernels, the projections that share an input fused
    (`fuse`; the runtime's loader and `edge-dlm bench --shape` both). False where nothing is routed (no
    compiler)."""
    from edge_dlm.model.quant import QuantLinear

    quant = any(isinstance(m, QuantLinear) for m in model.modules())
    bf16 = any(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in model.modules())
    attention = enable_attention(model)
    if not (quant or bf16) or not enable():
        return attention
    enable_bf16(model)
    fuse(model)
    return True


class Fused:
    """Linears that read one input (q / k / v; gate / up) as one kernel call on their weights laid side
    by side: the input is read (and for int8 / int4 rounded to int8) once, and a demo-model token makes
    17 calls instead of 29 (each ~2 us of dispatch). The modules' own weights are views of the fused one
    (bf16) or their kernel layouts are (int8 / int4), so nothing is held twice; each output is computed
    as the module alone computes it. Built by `fuse`; a device or dtype move or a load drops it."""

    def __init__(self, splits: list[int], in_features: int, weight: torch.Tensor, scales=None, zeros=None,
                 bits: int = 0, group: int = 0, max_rows: int = 0) -> None:
        self.splits, self.in_features, self.n = splits, in_features, sum(splits)
        self.weight, self.scales, self.zeros, self.bits, self.group, self.max_rows = \
            weight, scales, zeros, bits, group, max_rows

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = x.reshape(-1, self.in_features)
        if self.bits:
            y = x16_gemm(x2.float(), self.weight, self.scales, self.zeros, self.bits, self.group, self.n).to(x.dtype)
        elif x2.shape[0] <= self.max_rows and x.dtype == torch.bfloat16:
            y = bf16_gemm(x2, self.weight).to(x.dtype)
        else:  # wide bf16 passes: torch's GEMM, as `Bf16Linear`
            y = torch.nn.functional.linear(x2, self.weight)
        return y.reshape(*x.shape[:-1], self.n).split(self.splits, -1)


def fuse(model: torch.nn.Module) -> int:
    """Run each layer's q / k / v and gate / up projections as one `Fused` call where they share a
    format the kernels take (bf16 through `Bf16Linear`, or int8 / int4 in the 16-row layout, output
    widths multiples of 16); returns how many groups."""
    n = 0
    for layer in getattr(getattr(model, "encoder", None), "layers", ()):
        at, mlp = layer.self_attn, layer.mlp
        at.fused = _fused([at.q_proj, at.k_proj, at.v_proj])
        mlp.fused = _fused([mlp.gate_proj, mlp.up_proj])
        n += (at.fused is not None) + (mlp.fused is not None)
    return n


def _fused(mods: list) -> Fused | None:
    from edge_dlm.model.quant import QuantLinear

    k, splits = mods[0].in_features, [m.out_features for m in mods]
    if any(m.in_features != k for m in mods):
        return None
    if all(type(m) is Bf16Linear and m.bias is None for m in mods) and k % 32 == 0:
        w = _huge_pages(sum(splits) * k * 2).view(torch.bfloat16).view(sum(splits), k)
        row = 0
        for m in mods:
            w[row:row + m.out_features].copy_(m.weight.detach())
            m.weight = torch.nn.Parameter(w[row:row + m.out_features], requires_grad=m.weight.requires_grad)
            row += m.out_features
        return Fused(splits, k, w, max_rows=mods[0].max_rows)
    if not all(isinstance(m, QuantLinear) and _covers(m) and m.out_features % 16 == 0 and m.spec == mods[0].spec
               for m in mods):
        return None
    lays = [_layout(m) for m in mods]
    if any((lay[2] is None) != (lays[0][2] is None) for lay in lays):
        return None
    first = lays[0][0]
    weight = _huge_pages(sum(lay[0].numel() for lay in lays)).view(-1, *first.shape[1:])
    torch.cat([lay[0] for lay in lays], out=weight)
    scales = torch.cat([lay[1] for lay in lays])
    zeros = None if lays[0][2] is None else torch.cat([lay[2] for lay in lays])
    block = 0
    for m, lay in zip(mods, lays):
        b = slice(block, block + lay[0].shape[0])
        m.rebind(LAYOUT, (weight[b], scales[b], None if zeros is None else zeros[b]))
        block = b.stop
    return Fused(splits, k, weight, scales, zeros, mods[0].spec.bits, mods[0].spec.group_size)


def enable_attention(model: torch.nn.Module) -> bool:
    """Cached passes of up to `nld.NARROW` tokens attend through `attend` (a model whose head size is a
    multiple of 16). On the demo model, one thread, an AR step's attention (3 query rows, 300 cached
    tokens, a 512-slot window) costs ~6 us a layer this way against ~21 us through SDPA's flash kernel,
    and each row is computed alone, so a row's result never depends on the pass width."""
    if not hasattr(model, "narrow_attention") or model.config.head_dim % 16 or not usable():
        return False
    model.narrow_attention = attend
    return True


def enable() -> bool:
    """Route CPU int8 / int4 `QuantLinear` matmuls here (when a C compiler is present)."""
    from edge_dlm.model.quant import register_matmul

    if not usable():
        return False
    register_matmul("int8", "cpu", cpu_quant_matmul)
    register_matmul("int4", "cpu", cpu_quant_matmul)
    return True
