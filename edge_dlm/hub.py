"""Model resolution: the bundled demo model, a directory, or a name `ORG/NAME[@REVISION]` through
huggingface_hub's cache (the `pull`, `list` and `rm` commands are `edge_dlm.cli.hub`).

A name resolves to a snapshot directory of the Hugging Face cache (`models--ORG--NAME/snapshots/REV/`,
the same cache transformers, vLLM and SGLang use). Online, only the files edge-dlm reads are fetched
(`ALLOW`: safetensors, JSON, an ONNX graph; `*.py`, `*.bin` and every other pickle format are never
downloaded, and the loader refuses them anyway), with huggingface_hub's progress bars. With
`HF_HUB_OFFLINE=1` — or when the Hub cannot be reached — it resolves from the cache alone; a name not
there is a one-line error. A directory path keeps working: an existing directory always wins.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edge_dlm.primitives.errors import UserError

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
ALLOW = ["*.json", "*.safetensors", "model.onnx"]
NEVER = ["*.py", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.gguf"]
NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]{1,128}))?$")


def parse_name(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` reads as a Hub name, else None."""
    if spec.startswith((".", "/", "~")):
        return None
    m = NAME.match(spec)
    return (m["repo"], m["rev"]) if m else None


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("models by name need huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def resolve(spec: str | Path | None) -> Path:
    """A model argument -> a directory: None (the demo model), a directory, or `ORG/NAME[@REV]`."""
    if spec is None:
        if not (DEMO_MODEL / "config.json").exists():
            raise UserError(f"no --model given and the bundled demo model is missing at {DEMO_MODEL}")
        return DEMO_MODEL
    path = Path(spec).expanduser()
    name = parse_name(str(spec))
    if path.exists() or name is None:
        return path  # the checkpoint loader says precisely what is wrong with a path
    return snapshot(*name, download=not offline())


def display_name(path: Path) -> str:
    """A model directory's own name: `ORG/NAME` for a Hub cache snapshot, else the directory's name."""
    p = Path(path).resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return p.name


def full_revision(repo: str, revision: str | None) -> str | None:
    """A commit prefix (as `edge-dlm list` prints them) -> the cached commit it names; anything else
    (a branch, a tag, a full hash, a prefix nothing cached starts with) as given."""
    if not revision or len(revision) >= 40 or not re.fullmatch(r"[0-9a-f]{4,39}", revision):
        return revision
    snaps = cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
    try:
        found = sorted(p.name for p in snaps.iterdir() if p.name.startswith(revision))
    except OSError:
        return revision
    if len(found) > 1:
        raise UserError(f"{repo}@{revision} is ambiguous: cached revisions {', '.join(f[:12] for f in found)}; "
                        "give more characters")
    return found[0] if found else revision


def snapshot(repo: str, revision: str | None, *, download: bool) -> Path:
    """The cached snapshot of `repo@revision`, fetched first (allowed files only) when `download`."""
    hub = _hub()
    from huggingface_hub import errors

    label = repo + (f"@{revision}" if revision else "")
    revision = full_revision(repo, revision)
    try:
        return Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir(), allow_patterns=ALLOW,
                                          ignore_patterns=NEVER, local_files_only=not download))
    except errors.GatedRepoError:
        raise UserError(f"{label} is gated: accept its license on huggingface.co and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{label}: no such model on the Hugging Face Hub (a private one needs HF_TOKEN), and "
                        f"no directory of that name here") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{label}: the model has no revision {revision}") from None
    except (errors.LocalEntryNotFoundError, errors.CachedRepoTreeNotFoundError, OSError) as exc:
        why = "HF_HUB_OFFLINE is set" if not download else f"the Hub cannot be reached ({type(exc).__name__})"
        raise UserError(f"{label} is not in the Hugging Face cache ({cache_dir()}) and {why}; run `edge-dlm pull "
                        f"{label}` where the Hub is reachable, or pass a model directory") from None
    except errors.HfHubHTTPError as exc:
        raise UserError(f"{label}: the Hub answered {str(exc).splitlines()[0][:120]}") from None


# ---- edge-dlm pull / list / rm --------------------------------------------------------------------

def describe(snapshot_dir: Path) -> dict:
    """What a cached snapshot holds: model type and quantization, from its config.json."""
    try:
        cfg = json.loads((snapshot_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"model_type": None, "quantization": None}
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    scheme = q.get("scheme") or q.get("quant_method")
    if scheme and q.get("bits"):
        scheme = f"{scheme} int{q['bits']}"
    return {"model_type": cfg.get("model_type"), "quantization": scheme or "none"}


def cached_models() -> list[dict]:
    hub = _hub()
    try:
        info = hub.scan_cache_dir(cache_dir())
    except hub.CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            out.append({"name": repo.repo_id, "revision": rev.commit_hash, "refs": sorted(rev.refs),
                        "bytes": rev.size_on_disk, "path": str(rev.snapshot_path), **describe(rev.snapshot_path)})
    return out
