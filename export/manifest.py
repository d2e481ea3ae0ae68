"""`manifest.json`: what an exported artifact is, where it came from and what built it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors",)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_checksum(path: Path) -> str:
    """sha256 over config.json and every safetensors file of a checkpoint (names + contents, sorted)."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def tool_versions(*extra: str) -> dict[str, str]:
    """Versions of edge-dlm, torch, safetensors and any `extra` distributions that are installed."""
    out = {}
    for dist in ("edge-dlm", "torch", "safetensors", *extra):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(out_dir: Path, source: Path, **fields) -> dict:
    """Write `manifest.json` into `out_dir`: format version, source + checksum, files, `fields`."""
    files = {str(p.relative_to(out_dir)): p.stat().st_size
             for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": str(source.resolve()), "source_sha256": source_checksum(source),
                **fields, "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(path: Path) -> dict | None:
    """An artifact's manifest, None when it has none; a corrupt one is a one-line error."""
    from edge_dlm.primitives.errors import CheckpointError

    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc}); re-export the artifact") from None
