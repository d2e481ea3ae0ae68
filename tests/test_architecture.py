"""The layers hold (import-linter's contracts in pyproject.toml) and no file imports itself back.

Both checks read the package as it is installed: `edge_dlm/` with the side folders (`export/`,
`engines/`, `kernels/`, `tui/`) inside it, assembled from pyproject's package-dir in a temporary folder,
since an editable install maps them with a finder that static analysis does not follow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def assemble(dest: Path) -> Path:
    """The installed layout of edge_dlm under `dest` (sources only)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    skip = shutil.ignore_patterns("__pycache__", "demo_model", "*.pyc")
    for pkg, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(ROOT / folder, dest.joinpath(*pkg.split(".")), ignore=skip, dirs_exist_ok=True)
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.skip("import-linter is not installed (make test installs it)")
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_layer_contracts_hold(tmp_path):
    r = lint(assemble(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr  # import-linter's own report names the offending import
    assert "Contracts: 4 kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("model/config.py", "from edge_dlm.runtime import load", "model-below-runtime"),
    ("primitives/sampling.py", "from edge_dlm.cli.args import MODES", "core-below-applications"),
    ("decoding/base.py", "from edge_dlm.session.load import say", "layers"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, contract):
    tree = assemble(tmp_path)
    f = tree / "edge_dlm" / module
    # inside a function, as the project's lazy imports are: it must count all the same
    f.write_text(f.read_text() + f"\n\ndef _wrong():\n    {line}\n")
    r = lint(tree)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "BROKEN" in out and line.split()[1] in out, out


def cycles(graph, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    mods = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in set(mods)) for m in mods}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in mods:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def graph_of(tree: Path):
    sys.path.insert(0, str(tree))
    saved = {k: v for k, v in sys.modules.items() if k == "edge_dlm" or k.startswith("edge_dlm.")}
    for k in saved:
        del sys.modules[k]
    try:
        return grimp.build_graph("edge_dlm", exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(tree))
        for k in [k for k in sys.modules if k == "edge_dlm" or k.startswith("edge_dlm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_no_import_circle_among_the_files(tmp_path):
    graph = graph_of(assemble(tmp_path))
    assert len(graph.modules) > 60  # the side folders are in the graph too
    assert "edge_dlm.kernels.verify" in graph.modules and "edge_dlm.tui.app" in graph.modules
    assert cycles(graph, "edge_dlm") == []


def test_the_circle_check_sees_function_local_imports(tmp_path):
    tree = assemble(tmp_path)
    f = tree / "edge_dlm" / "primitives" / "errors.py"
    f.write_text(f.read_text() + "\n\ndef _back():\n    from edge_dlm.primitives import fsutil\n")
    found = cycles(graph_of(tree), "edge_dlm")
    assert any({"edge_dlm.primitives.errors", "edge_dlm.primitives.fsutil"} <= set(c) for c in found), found
