"""Every package folder is listed in pyproject (an unlisted one would vanish from the wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

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


def test_wheel_carries_the_data_files(tmp_path):
    """Package data the code opens at run time is inside the wheel, not just in the checkout."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [whl] = tmp_path.glob("edge_dlm-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for needed in ("edge_dlm/demo_model/model.safetensors", "edge_dlm/demo_model/tokenizer.json",
                   "edge_dlm/primitives/prompts.json", "edge_dlm/export/tensorrt_onnx_ops.txt",
                   "edge_dlm/kernels/attention.py", "edge_dlm/engines/ort_engine.py"):
        assert needed in names, needed
