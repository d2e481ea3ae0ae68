"""`edge-dlm pull`, `list` and `rm`: models by name in the Hugging Face cache (`edge_dlm.hub` resolves them)."""

from __future__ import annotations

import argparse
import json
import sys

from edge_dlm.hub import _hub, cache_dir, cached_models, offline, parse_name, snapshot
from edge_dlm.primitives.errors import UserError


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
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (it asks only in a terminal)")


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
    if not a.yes and sys.stdin.isatty():
        size = sum(r.size_on_disk for r in revisions)
        answer = input(f"remove {repo} ({len(revisions)} revision{'s' if len(revisions) > 1 else ''}, "
                       f"{size / 2**20:.1f} MiB)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed", file=sys.stderr)
            return 0
    strategy = info.delete_revisions(*[r.commit_hash for r in revisions])
    strategy.execute()
    print(f"removed {repo} ({len(revisions)} revision{'s' if len(revisions) > 1 else ''}), "
          f"freed {strategy.expected_freed_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0
