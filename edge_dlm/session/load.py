"""Command-line options -> a loaded `Runtime`, with `--mode auto` resolved from the calibration table.

Shared by the three applications (the CLI, the chat screen, the server); the flags themselves are
declared in `edge_dlm.cli.args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from edge_dlm.session.calibrate import (AUTO_ENGINE, Row, Table, calibrate, check_preferences, choose, load_table,
                                        onnx_candidate, open_onnx, table_key, target)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bar(label: str, done: int, total: int) -> None:
    """A one-line progress bar on stderr; the call with done == total ends the line."""
    filled = int(30 * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * filled:<30}] {done}/{total} {label:<34}", end=end, file=sys.stderr, flush=True)


def load_runtime(a: argparse.Namespace):
    """The Runtime the model flags (`edge_dlm.cli.args.add_model_args`) ask for."""
    from edge_dlm.runtime import load

    return load(a.model, device=a.device, dtype=None if a.dtype == "auto" else a.dtype,
                         lora=not a.no_lora, quant=a.quant, group_size=a.group_size, calibrate=a.calibrate,
                         kernels=a.kernels, engine=a.engine)


@dataclasses.dataclass
class Auto:
    """What `load_auto` resolved: the runtime to use, the row it runs, the reason and the table."""

    runtime: object
    row: Row
    reason: str
    table: Table


def load_auto(a: argparse.Namespace, *, log: Callable[[str], None] = say,
              progress: Callable[[str, int, int], None] | None = None, recalibrate: bool = False,
              check: Callable[[object], None] | None = None) -> Auto:
    """Load the model for `--mode auto`: calibrate once if needed, then pick engine, mode and steps.

    `check(runtime)` validates the request before a calibration (a bad request fails fast, alone)."""
    from edge_dlm import engines

    check_preferences(a.prefer, a.power_budget)
    t = target(a)
    key = table_key(t)
    loaded = engines.select(t.engine, t.path, t.device)
    table = None if recalibrate else load_table(key)
    rt = None
    if table is None:
        rt = load_runtime(a)
        if check is not None:
            check(rt)
        log(f"edge-dlm: calibrating {t.path.name} on {t.device} ({rt.precision}) for --mode auto; once per model "
            "and machine, `edge-dlm calibrate` re-runs it")
        table = calibrate(rt, t, progress=progress or bar, key=key)
    allowed = {loaded} | ({AUTO_ENGINE} if loaded == "torch" and onnx_candidate(t, loaded) is None else set())
    row, reason = choose(table, a.prefer, a.power_budget, a.allow_lossy, engines=allowed)
    if row.engine != loaded:
        other = open_onnx(t, key, build=False)
        if other is None:  # the cache lost the engine: measure again (it rebuilds it)
            return load_auto(a, log=log, progress=progress, recalibrate=True, check=check)
        rt = other
    elif rt is None:
        rt = load_runtime(a)
    return Auto(rt, row, reason, table)
