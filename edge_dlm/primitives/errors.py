"""User-facing errors.

Anything the user can fix (a bad path, a bad flag, a corrupt checkpoint) raises `UserError`; the CLI
prints its one-line message and exits with code 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user can correct. `str(err)` is one actionable line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded (missing, corrupt, wrong format)."""


def install_hint(extra: str) -> str:
    """The command that installs an optional extra (edge-dlm is installed from its clone, not an index)."""
    return f".venv/bin/pip install -e '.[{extra}]' in the edge-dlm clone"


class MissingDependencyError(UserError):
    """An optional dependency (an extra) that a requested feature needs is not installed."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{module}' package, which is not installed; install it with: {install_hint(extra)}"
        )


def require(module: str, extra: str, feature: str):
    """Import an optional dependency or raise `MissingDependencyError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, extra, feature) from exc
