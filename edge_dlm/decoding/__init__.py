"""Decoding modes, one module each, looked up by name (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

from edge_dlm.decoding.base import (MODES, SPECULATIVE, Canvas, Decoder, Done, Draft, Emit, Event,
                                    GenerationOptions, Result)
from edge_dlm.primitives.errors import UserError

_MODULES = {"ar": "ar", "diffusion": "diffusion", "linear-spec": "linear_spec",
            "quadratic-spec": "quadratic_spec"}


def mode_fn(mode: str) -> Callable[[Decoder, list[int]], Iterator[Event]]:
    """The `generate(dec, prompt_ids)` generator of a mode."""
    if mode not in _MODULES:
        raise UserError(f"mode '{mode}' not supported; known: {', '.join(MODES)}")
    return importlib.import_module(f"edge_dlm.decoding.{_MODULES[mode]}").generate


__all__ = ["MODES", "SPECULATIVE", "Canvas", "Decoder", "Done", "Draft", "Emit", "Event",
           "GenerationOptions", "Result", "mode_fn"]
