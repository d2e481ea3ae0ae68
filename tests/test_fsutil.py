"""Atomic writes: nothing half-written survives a failure; results get ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.fsutil import atomic_dir, atomic_write_bytes


def test_failed_atomic_dir_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_atomic_dir_refuses_existing_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="--force"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (tmp_path / "out" / "a").read_text() == "new"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~_current_umask()


def test_atomic_write_bytes_mode(tmp_path):
    atomic_write_bytes(tmp_path / "f.png", b"data")
    assert (tmp_path / "f.png").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "f.png").stat().st_mode) == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
