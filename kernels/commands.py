"""The compiler command lines of the CPU kernels and their torch operators, in one place: read by setup.py
(by path: it cannot import the package it is building) and by `cpu_build` (builds at first use). Standard
library only. Each returns the command up to its output path, which the caller appends."""

from __future__ import annotations

import sys
from pathlib import Path


# The CPU kernels' C (kernels/csrc/): one file per kernel family, compiled together into one library per
# instruction set, and the headers they share (cpu_kernels.h: the entry points; common.h: the rest).
KERNEL_SOURCES = ("threads.c", "x16.c", "bf16.c", "attend.c", "pointwise.c")
KERNEL_HEADERS = ("cpu_kernels.h", "common.h")


def kernels(cc: str, flags: list[str], sources: list[str], include: str) -> list[str]:
    """The kernel families' `sources` (`KERNEL_SOURCES`' paths) for one instruction set (`flags`: its
    -march) into one library. No -ffast-math: the kernels' order of operations is kept; -pthread: the
    kernels' own threads where no parallel function is installed; -I: the folder holding the headers."""
    return [cc, "-O3", *flags, "-pthread", "-shared", "-fPIC", f"-I{include}", *sources, "-lm", "-o"]


def operators(cxx: str, torch, source: str, include: str) -> list[str]:
    """cpu_ops.cpp against `torch` (the module): its headers, its C++ ABI, its libraries. Where torch's
    intra-op threads are OpenMP's (its parallel backend says so; Linux wheels), the operators are built with
    OpenMP too, so that ATen's parallel_for (inline in torch's headers) runs the kernels' ranges on torch's
    threads: the OpenMP runtime they link is the one torch already loaded (the same soname), no second pool.
    Elsewhere (macOS' clang has no OpenMP) the kernels run their own threads per call."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    omp = ["-fopenmp"] if sys.platform.startswith("linux") and \
        "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
    return [cxx, "-O2", "-std=c++20", "-shared", "-fPIC", *omp, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}",
            f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", source,
            f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", "-o"]
