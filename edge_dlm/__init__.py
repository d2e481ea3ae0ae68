"""edge-dlm: a local runtime for Nemotron-Labs-Diffusion block-diffusion language models.

Light on import: torch and everything heavy load on first use of `load()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from edge_dlm.decoding.base import Canvas, Done, Draft, Emit, Result
    from edge_dlm.runtime import Runtime, Text, load

_LAZY = {"load": "edge_dlm.runtime", "Runtime": "edge_dlm.runtime", "Text": "edge_dlm.runtime",
         "Result": "edge_dlm.decoding.base", "Canvas": "edge_dlm.decoding.base",
         "Draft": "edge_dlm.decoding.base", "Emit": "edge_dlm.decoding.base",
         "Done": "edge_dlm.decoding.base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge_dlm' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]
