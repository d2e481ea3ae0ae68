"""Atomic file and directory writes: never leave a partial artifact behind."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.inputs import kind_of


def cache_root() -> Path:
    """edge-dlm's user cache folder (calibration tables, compiled kernels, engines): the platform's
    (platformdirs: $XDG_CACHE_HOME/edge-dlm or ~/.cache/edge-dlm on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("edge-dlm"))


def set_aside(path: str | Path, why: str) -> None:
    """A damaged cache or data file: renamed `NAME.bad` (kept for a look, never read again) with one line
    on stderr, so the caller rebuilds or re-measures it; where it cannot be moved, only the line."""
    import sys

    path = Path(path)
    try:
        os.replace(path, path.with_name(path.name + ".bad"))
        where = f"moved to {path.name}.bad"
    except OSError as exc:
        where = f"could not move it ({exc.strerror})"
    print(f"edge-dlm: set aside the damaged file {path} ({why}; {where}); a new one is made", file=sys.stderr)


def set_aside_files() -> list[Path]:
    """What `set_aside` moved out of the way under edge-dlm's cache and data folders (for `doctor`)."""
    import platformdirs

    roots = [cache_root(), Path(platformdirs.user_data_dir("edge-dlm", appauthor=False))]
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*.bad"))


_UNWRITABLE: set[str] = set()


def write_cache(path: str | Path, data: bytes, what: str) -> bool:
    """Keep `data` at `path` in a cache folder (atomically). A cache is optional: where the disk refuses
    (full, a quota, read-only, failing, no permission) the command goes on, with one line on stderr the
    first time a folder refuses; returns whether it was kept."""
    import sys

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return True
    except (OSError, UserError) as exc:
        if str(path.parent) not in _UNWRITABLE:
            _UNWRITABLE.add(str(path.parent))
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"edge-dlm: could not keep {what} in {path.parent} ({why}); going on without it "
                  "(it is measured or built again next time)", file=sys.stderr)
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: Path) -> None:
    """Tidy what an interrupted write left beside `target`: a previous artifact moved aside by a
    `--force` swap that was killed goes back into place, and the temporary files and folders of dead
    processes (`.NAME.tmp-PID-*`, `.NAME.old-PID`) are removed."""
    if not target.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for p in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            pid = p.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not target.exists() and not target.is_symlink():
                p.rename(target)  # the swap was interrupted after the old artifact moved aside
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target`, on failure it vanishes.

    An existing `target` is an error unless `force`. Ctrl-C or any exception leaves no `target`; a kill
    leaves `target` as it was (complete or absent), and the next call tidies what the kill left (`recover`).
    """
    target = Path(target)
    recover(target)
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create private files
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if _exchange(tmp, target):  # target is the new artifact at once; tmp holds the old one
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def check_output_file(path: str | Path) -> Path:
    """`path` when a file can be written there: its folder exists and it is not a directory or a device."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    if path.exists() and not path.is_file():
        raise UserError(f"cannot write {path}: it is {kind_of(path.stat().st_mode)}, not a regular file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: permission denied in {path.parent}")
    return path


def temp_file(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, named for this process so that the next write
    to `path` removes it if this process is killed first (`recover`)."""
    recover(path)
    return tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename it into place."""
    path = check_output_file(path)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_room(out: str | Path, need: int, what: str) -> None:
    """Refuse, before any work, an output of about `need` bytes that the filesystem holding `out` has no
    room for (one line naming the folder, what it has, and `what`: "the GGUF needs")."""
    import shutil

    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        from edge_dlm.primitives.errors import UserError

        raise UserError(f"{parent} has {free / 2**30:.2f} GiB free; {what} about {need / 2**30:.2f} GiB "
                        "(free some space or pick another -o)")
