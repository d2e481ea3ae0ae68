"""Builds the CPU kernels when the package is built (`pip install .`, `pip wheel .`, `make chat`): the C
kernels (kernels/csrc/*.c, one file per kernel family) once per instruction set this machine's architecture has
(kernels/csrc/variants.json; edge-dlm loads the best one the CPU runs), and, where torch is importable
while building (`--no-build-isolation`, as the Makefile installs), their torch operators
(kernels/csrc/cpu_ops.cpp, built against that torch). Everything else is in pyproject.toml.

A part that does not build (no compiler, an unknown -march) is said and left out: the package still
installs, and edge-dlm builds the kernels for the machine at first use where a compiler is there."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = HERE / "kernels" / "csrc"


def _commands():
    """kernels/commands.py, the compiler command lines edge-dlm's first-use builds use too (read by path:
    the package is not importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("edge_dlm_commands", HERE / "kernels" / "commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


commands = _commands()


def say(line: str) -> None:
    print(f"edge-dlm kernels: {line}", file=sys.stderr, flush=True)


def arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def compile_into(command: list[str], out: Path) -> str | None:
    """Run `command` (its output path last) into a temporary file renamed to `out` with its checksum
    beside it (`out.sha256`, checked before the library is loaded); None, or why it failed."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        r = subprocess.run([*command, str(tmp)], capture_output=True, text=True)
    except OSError as exc:
        return f"{command[0]}: {exc.strerror or exc}"
    if r.returncode != 0:  # no stale library of an older source left in its place
        for stale in (tmp, out, out.with_name(out.name + ".sha256")):
            stale.unlink(missing_ok=True)
        return " | ".join([ln for ln in r.stderr.strip().splitlines() if ln.strip()][-3:])[:400]
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, out)
    out.with_name(out.name + ".sha256").write_text(digest)
    return None


def torch_tag(torch) -> str:
    """The torch build the operators are made for (kernels/cpu_matmul.py reads the same name)."""
    return "".join(c if c.isalnum() or c == "." else "_" for c in torch.__version__) + \
        f"-abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


class BuildKernels(build_ext):
    def build_extensions(self) -> None:
        dest = (HERE / "kernels" / "lib") if self.inplace else Path(self.build_lib) / "edge_dlm" / "kernels" / "lib"
        dest.mkdir(parents=True, exist_ok=True)
        self.built = []
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        variants = json.loads((CSRC / "variants.json").read_text()).get(arch(), [])
        if cc is None or not variants:
            say(f"not built ({'no C compiler (cc)' if cc is None else 'no variants for ' + arch()}); "
                "edge-dlm builds them at first use where a compiler is there")
            return
        for v in variants:
            out = dest / f"cpu_kernels-{v['name']}.so"
            sources = [str(CSRC / f) for f in commands.KERNEL_SOURCES]
            why = compile_into(commands.kernels(cc, v["flags"], sources, str(CSRC)), out)
            say(f"{v['name']}: " + ("built" if why is None else f"not built ({why})"))
            if why is None:
                self.built += [out, out.with_name(out.name + ".sha256")]
        self.build_operators(dest)
        # the sources built from: a source checkout whose C changed since builds at first use instead
        sources = dest / "sources.json"
        sources.write_text(json.dumps({f: hashlib.sha256((CSRC / f).read_bytes()).hexdigest()
                                       for f in (*commands.KERNEL_SOURCES, *commands.KERNEL_HEADERS, "cpu_ops.cpp")}))
        self.built.append(sources)

    def build_operators(self, dest: Path) -> None:
        try:
            import torch
        except ImportError:
            say("operators not built (torch is not importable while building: install with "
                "--no-build-isolation to build them now); edge-dlm builds them at first use")
            return
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            say("operators not built (no C++ compiler)")
            return
        out = dest / f"cpu_ops-{torch_tag(torch)}.so"
        why = compile_into(commands.operators(cxx, torch, str(CSRC / "cpu_ops.cpp"), str(CSRC)), out)
        say(f"operators for torch {torch.__version__}: " + ("built" if why is None else f"not built ({why})"))
        if why is None:
            self.built += [out, out.with_name(out.name + ".sha256")]

    def get_outputs(self) -> list[str]:
        return [str(p) for p in getattr(self, "built", [])]

    def copy_extensions_to_source(self) -> None:  # an editable install: beside the sources (kernels/lib)
        src = HERE / "kernels" / "lib"
        src.mkdir(exist_ok=True)
        for p in getattr(self, "built", []):
            if p.parent != src:
                shutil.copyfile(p, src / (p.name + ".tmp"))
                os.replace(src / (p.name + ".tmp"), src / p.name)


# One placeholder extension makes setuptools run `build_ext` (and mark the wheel as this platform's);
# `BuildKernels` builds the libraries instead of a Python module.
setup(ext_modules=[Extension("edge_dlm.kernels._cpu", sources=[])], cmdclass={"build_ext": BuildKernels})
