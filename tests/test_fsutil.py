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


@pytest.mark.parametrize("code", [28, 122, 30, 5, 13])  # ENOSPC, EDQUOT, EROFS, EIO, EACCES
def test_a_cache_the_disk_refuses_is_one_line_once_and_the_command_goes_on(tmp_path, monkeypatch, capsys, code):
    """The calibration table and the measured thread count are caches: a disk that refuses them is one
    line the first time (per folder), never an exit; nothing partial is left."""
    import os

    from edge_dlm.primitives import fsutil, machine

    monkeypatch.setattr(fsutil, "_UNWRITABLE", set())

    def refusing(path, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fsutil, "atomic_write_bytes", refusing)
    monkeypatch.setattr(machine, "_threads_file", lambda: tmp_path / "threads.json")
    assert fsutil.write_cache(tmp_path / "t.json", b"{}", "the calibration table") is False
    machine.record_threads(2, {1: [1.0], 2: [2.0]})
    machine.record_threads(1, {1: [1.0]})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(code) in err[0] and "going on" in err[0]
    assert not list(tmp_path.iterdir())
