"""Models by name: `ORG/NAME[@REVISION]` through huggingface_hub's cache, and `pull`, `list`, `rm`.

A name resolves to a snapshot directory of the Hugging Face cache (`models--ORG--NAME/snapshots/REV/`,
the same cache transformers, vLLM and SGLang use). Online, only the files edge-dlm reads are fetched
(`ALLOW`: safetensors, JSON, an ONNX graph; `*.py`, `*.bin` and every other pickle format are never
downloaded, and the loader refuses them anyway), with huggingface_hub's progress bars. With
`HF_HUB_OFFLINE=1` — or when the Hub cannot be reached — it resolves from the cache alone; a name not
there is a one-line error. A directory path keeps working: an existing directory always wins.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from edge_dlm.errors import UserError

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
    from edge_dlm.runtime import default_model_path

    if spec is None:
        return default_model_path()
    path = Path(spec).expanduser()
    name = parse_name(str(spec))
    if path.exists() or name is None:
        return path  # the checkpoint loader says precisely what is wrong with a path
    return snapshot(*name, download=not offline())


def snapshot(repo: str, revision: str | None, *, download: bool) -> Path:
    """The cached snapshot of `repo@revision`, fetched first (allowed files only) when `download`."""
    hub = _hub()
    from huggingface_hub import errors

    label = repo + (f"@{revision}" if revision else "")
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

def _name_arg(value: str) -> tuple[str, str | None]:
    name = parse_name(value)
    if name is None:
        raise argparse.ArgumentTypeError(f"'{value}' is not a model name ORG/NAME[@REVISION]")
    return name


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", type=_name_arg, help="ORG/NAME[@REVISION] on the Hugging Face Hub")


def run_pull(a: argparse.Namespace) -> int:
    repo, rev = a.name
    if offline():
        raise UserError("HF_HUB_OFFLINE is set: unset it to pull from the Hub")
    path = snapshot(repo, rev, download=True)
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"{repo}{'@' + rev if rev else ''}: {len(files)} files, {size / 2**20:.1f} MiB in {path}")
    print(f"run it: edge-dlm chat --model {repo}{'@' + rev if rev else ''}")
    return 0


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


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def run_list(a: argparse.Namespace) -> int:
    models = cached_models()
    if a.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no models in the Hugging Face cache ({cache_dir()}); `edge-dlm pull ORG/NAME` fetches one")
        return 0
    print(f"{'model':<44} {'revision':<12} {'refs':<10} {'size':>10}  {'type':<26} quantization")
    for m in models:
        print(f"{m['name']:<44} {m['revision'][:10]:<12} {','.join(m['refs']) or '-':<10} "
              f"{m['bytes'] / 2**20:>8.1f}Mi  {m['model_type'] or '?':<26} {m['quantization']}")
    return 0


def add_rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", type=_name_arg, help="ORG/NAME (every cached revision) or ORG/NAME@REVISION")


def run_rm(a: argparse.Namespace) -> int:
    hub = _hub()
    repo, rev = a.name
    try:
        info = hub.scan_cache_dir(cache_dir())
    except hub.CacheNotFound:
        info = None
    repos = [r for r in (info.repos if info else []) if r.repo_id == repo and r.repo_type == "model"]
    if not repos:
        raise UserError(f"{repo} is not in the Hugging Face cache ({cache_dir()}); `edge-dlm list` shows what is")
    revisions = [r for r in repos[0].revisions if rev is None or r.commit_hash.startswith(rev) or rev in r.refs]
    if not revisions:
        raise UserError(f"{repo} has no cached revision {rev}; cached: "
                        f"{', '.join(r.commit_hash[:10] for r in repos[0].revisions)}")
    strategy = info.delete_revisions(*[r.commit_hash for r in revisions])
    strategy.execute()
    print(f"removed {repo} ({len(revisions)} revision{'s' if len(revisions) > 1 else ''}), "
          f"freed {strategy.expected_freed_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0
