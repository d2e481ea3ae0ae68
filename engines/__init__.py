"""Engines: run an artifact behind one contract (edge_dlm.engines).

An engine is what the decoders call for a model pass:

    engine(tokens [1, T], positions [1, T], *, cache: KVCache, attn: Attn, use_lora=False) -> logits [1, T, V]

It attends over `cache`'s committed tokens plus the T new ones under the pattern `attn`, and leaves
the new K/V pending in `cache` (the decoder commits or drops them: rollback is the cache's). It also
has `config` (NLDConfig), `new_cache(capacity)`, `has_lora`, `device` and `close()`.

Each engine module has `availability(path, device) -> list[str]` (empty when it can run that
artifact there, else the reasons), `versions() -> dict` and `open(path, device, dtype, lora)`.
`--engine auto` takes the first available in `ORDER`; `edge-dlm doctor` prints the table.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edge_dlm.primitives.errors import UserError

# name -> module; auto prefers them in this order
ENGINES = {"tensorrt": "edge_dlm.engines.trt_engine", "tensorrt-rtx": "edge_dlm.engines.trt_rtx_engine",
           "onnxruntime": "edge_dlm.engines.ort_engine", "torch": "edge_dlm.engines.torch_engine"}
ORDER = tuple(ENGINES)


def module(name: str):
    if name not in ENGINES:
        raise UserError(f"engine '{name}' not supported; known: auto, {', '.join(ENGINES)}")
    return importlib.import_module(ENGINES[name])


def availability(path: Path, device: str) -> dict[str, list[str]]:
    """Engine name -> reasons it cannot run `path` on `device` (empty list: it can)."""
    return {name: module(name).availability(path, device) for name in ORDER}


def select(name: str, path: Path, device: str) -> str:
    """The engine to use for `--engine name` (auto: the first available), or a one-line error."""
    table = availability(path, device)
    if name == "auto":
        for n in ORDER:
            if not table[n]:
                return n
        if not any((path / f).exists() for f in ("model.onnx", "manifest.json")):
            return "torch"  # not an exported artifact: the checkpoint loader says precisely what is wrong
        why = "; ".join(f"{n}: {r[0]}" for n, r in table.items())
        raise UserError(f"no engine can run {path} on {device} ({why})")
    module(name)
    if table[name]:
        raise UserError(f"engine {name} cannot run {path} on {device}: {'; '.join(table[name])}")
    return name
