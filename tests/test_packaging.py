"""Every package folder is listed in pyproject (an unlisted one would vanish from the wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts or "demo_model" in rel.parts:
                continue
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed


def test_side_folders_import_inside_the_namespace():
    import edge_dlm.engines
    import edge_dlm.export
    import edge_dlm.kernels
    import edge_dlm.tui

    for mod in (edge_dlm.export, edge_dlm.engines, edge_dlm.kernels, edge_dlm.tui):
        assert Path(mod.__file__).resolve().parent.parent == ROOT
