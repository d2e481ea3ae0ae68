"""`edge-dlm calibrate`: measure every configuration again (progress bar), cache and print the table."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_model_args

    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.session.calibrate import calibrate, target
    from edge_dlm.session.load import bar, load_runtime

    t = target(a)
    rt = load_runtime(a)
    table = calibrate(rt, t, progress=None if a.json else bar)
    print(json.dumps(table.to_json(), indent=2) if a.json else table.format())
    return 0
