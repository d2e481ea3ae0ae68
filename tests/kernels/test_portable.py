"""The CPU kernels' C source builds for every instruction set and computes the same numbers there: on
x86-64 with this CPU's extensions (AVX-512 here), AVX2 only, and none (the portable loops), and for
aarch64 (ARM laptops and servers) with a cross compiler, run under qemu. int8 / int4 results are equal
bit for bit across every build (the kernels feed each output in one order whatever the vector width);
bf16 sums differ in the last bits between vector paths (compared to 1e-3 of a row's largest value).
The harness is tests/kernels/portable_check.c."""

from __future__ import annotations

import json
import platform
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("portable_check.c")
CSRC = ROOT / "kernels" / "csrc"
# the kernel families' files, as kernels/commands.py lists them (run by path, as setup.py reads it: stdlib only)
SOURCES = [CSRC / f for f in runpy.run_path(str(ROOT / "kernels" / "commands.py"))["KERNEL_SOURCES"]]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags")), "").split())


def build(tmp: Path, name: str, cc: str, *flags: str) -> Path:
    out = tmp / name
    run = subprocess.run([cc, "-O3", "-pthread", *flags, f"-I{CSRC}", str(HARNESS), *map(str, SOURCES), "-lm", "-o",
                          str(out)], capture_output=True, text=True)
    assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
    return out


def outputs(cmd: list[str]) -> tuple[dict[str, list[float]], int]:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{Path(cmd[-1]).name}: {run.stderr[-500:]}"  # e.g. a row that differs alone
    rows = {}
    for line in run.stdout.splitlines():
        head, *vals = line.split()
        n = 4 if head == "x16" else 1
        rows[" ".join([head, *vals[:n]])] = [float.fromhex(v) for v in vals[n:]]
    return rows, int(run.stderr.strip().split("=")[-1])


def builds(tmp: Path) -> dict[str, tuple[dict, int]]:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the kernels")
    out = {}
    if platform.machine() == "x86_64":
        flags = cpu_flags()
        out["native"] = outputs([str(build(tmp, "native", "gcc", "-march=native"))])
        if "avx2" in flags and "fma" in flags:
            out["avx2"] = outputs([str(build(tmp, "avx2", "gcc", "-march=x86-64-v3"))])
        out["generic"] = outputs([str(build(tmp, "generic", "gcc", "-march=x86-64"))])
    else:
        out["native"] = outputs([str(build(tmp, "native", "gcc", "-march=native"))])
    return out


def small_ops_agree(rows: dict, ref: dict, name: str) -> None:
    """The small operations of a layer (pointwise.c: no fused multiply-adds, the same roundings in every build)
    bit for bit; `rope_attend`'s attention within 1e-6 of its largest value (its sums run in fused
    multiply-adds where the build has them); both dtypes."""
    keys = [k for k in ref if k.split()[0] in ("norm", "silu", "rope", "cache")]
    assert len(keys) == 8, name
    for key in keys:
        if key.startswith("rope"):
            scale = max(abs(v) for v in ref[key])
            assert max(abs(a - b) for a, b in zip(rows[key], ref[key])) <= 1e-6 * scale, (name, key)
        else:
            assert rows[key] == ref[key], (name, key)


def test_every_x86_build_computes_the_same_numbers(tmp_path):
    got = builds(tmp_path)
    ref, _ = got["generic" if "generic" in got else "native"]
    assert {simd for _, simd in got.values()} >= ({0} if "generic" in got else set())
    for name, (rows, _) in got.items():
        for key, vals in ref.items():
            if key.startswith("x16"):
                assert rows[key] == vals, (name, key)
        small_ops_agree(rows, ref, name)
        for key, vals in rows.items():
            if key.startswith("bf16") and key in got["native"][0]:
                base = got["native"][0][key]
                scale = max(abs(v) for v in base)
                assert max(abs(a - b) for a, b in zip(vals, base)) <= 1e-3 * scale, (name, key)


def test_the_aarch64_build_computes_the_x86_numbers(tmp_path):
    """ARM: the source builds with aarch64's compiler (no x86 header reaches it) and, run under qemu
    (which emulates every ARMv8 extension), gives the int8 / int4 results of every x86 build bit for bit
    in each aarch64 variant of `kernels/csrc/variants.json`: the int8 matrix multiply (`smmla`) with bf16
    dot products (`bfdot`), the dot product (`sdot`) with bf16 widened to float32, and the portable loops
    of ARMv8.0 (bf16 in NEON), with and without zero points; bf16 within 1e-3 of a row's largest value of
    the x86 build's; the small operations of a layer as `small_ops_agree` says; in each, a row's result the
    same in a wide pass as alone (the harness checks)."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64")
    if platform.machine() == "aarch64":
        pytest.skip("an aarch64 host: test_every_x86_build_computes_the_same_numbers builds natively")
    if cc is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user; "
                    ".ci/run installs them)")
    got = {}
    for v in json.loads((CSRC / "variants.json").read_text())["aarch64"]:
        exe = build(tmp_path, f"arm-{v['name']}", cc, *v["flags"], "-static")
        got[v["name"]] = outputs([qemu, str(exe)])
        objdump = shutil.which("aarch64-linux-gnu-objdump")
        if objdump:  # the variant runs the instructions it is made for
            text = subprocess.run([objdump, "-d", str(exe)], capture_output=True, text=True, check=True).stdout
            assert {"smmla": "i8mm" in v["cpu"], "bfdot": "bf16" in v["cpu"]} == \
                {op: f"\t{op}\t" in text for op in ("smmla", "bfdot")}, v["name"]
    assert [simd for _, simd in got.values()] == [128, 128, 0]  # NEON (smmla, sdot), and the portable loops
    x86 = {}
    if platform.machine() == "x86_64":
        x86 = outputs([str(build(tmp_path, "native", "gcc", "-march=native"))])[0]
    for name, (rows, _) in got.items():
        x16 = {k: v for k, v in rows.items() if k.startswith("x16")}
        assert any("z=1" in k for k in x16) and any("z=0" in k for k in x16)  # zero points and signed weights
        assert x16 == {k: v for k, v in got["generic"][0].items() if k.startswith("x16")}, name
        if x86:
            assert x16 == {k: v for k, v in x86.items() if k.startswith("x16")}, name
            small_ops_agree(rows, x86, name)
        bf16 = {k: v for k, v in rows.items() if k.startswith("bf16")}
        assert len(bf16) == 4, name  # every aarch64 build has the NEON bf16 kernel
        for key, vals in bf16.items():
            if key in x86:
                scale = max(abs(v) for v in x86[key])
                assert max(abs(a - b) for a, b in zip(vals, x86[key])) <= 1e-3 * scale, (name, key)
