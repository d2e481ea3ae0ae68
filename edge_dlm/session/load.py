"""Command-line options -> a loaded `Runtime`, with `--mode auto` resolved from the calibration table.

Shared by the three applications (the CLI, the chat screen, the server); the flags themselves are
declared in `edge_dlm.cli.args`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import threading
from typing import Callable

from edge_dlm.primitives.errors import UserError
from edge_dlm.session.calibrate import (AUTO_ENGINE, Row, Table, calibrate, check_preferences, choose, load_table,
                                        onnx_candidate, open_onnx, table_key, target)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bar(label: str, done: int, total: int) -> None:
    """A one-line progress bar on stderr; the call with done == total ends the line."""
    filled = int(30 * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * filled:<30}] {done}/{total} {label:<34}", end=end, file=sys.stderr, flush=True)


ENGINE_RULE = ("--engine auto runs an artifact on its own engine; a checkpoint on torch, or on the ONNX engine "
               "auto built in the cache wherever this machine's calibration measured it faster for the mode "
               "asked (--mode auto and an explicit --mode alike)")


def load_runtime(a: argparse.Namespace, mode: str | None = None, steps: int | None = None, log=say):
    """The Runtime the model flags (`edge_dlm.cli.args.add_model_args`) ask for, on the engine
    `ENGINE_RULE` gives for `mode` (and `steps`); `--engine onnxruntime` on a checkpoint is the engine
    auto built for it."""
    from edge_dlm.runtime import load

    def plain():
        return load(a.model, device=a.device, dtype=None if a.dtype == "auto" else a.dtype,
                    lora=not a.no_lora, quant=a.quant, group_size=a.group_size, calibrate=a.calibrate,
                    kernels=a.kernels, engine=a.engine, threads=getattr(a, "threads", None),
                    compile=getattr(a, "compile", "auto"), tokens=getattr(a, "one_shot_tokens", None))

    if a.engine not in ("auto", AUTO_ENGINE) or (a.engine == "auto" and mode is None):
        return plain()
    t = dataclasses.replace(target(a), engine="auto")  # the engine auto builds is keyed by auto's target
    if (t.path / "model.onnx").exists():  # an ONNX artifact: its own engine
        return plain()
    key = table_key(t)
    if a.engine == AUTO_ENGINE:
        rt = open_onnx(t, key, build=False)
        if rt is None:
            why = onnx_candidate(t, "torch")
            first = f"auto builds none for it here ({why})" if why else "`edge-dlm calibrate` builds the one auto uses"
            raise UserError(f"{t.path.name} is a checkpoint with no ONNX engine yet: {first}; "
                            "`edge-dlm export --target onnx` builds one of your own")
        return rt
    table = load_table(key)
    if table is None or onnx_candidate(t, "torch") is not None:
        return plain()
    rows = [r for r in table.rows if r.mode == mode and (mode != "diffusion" or r.steps == steps)]
    best = max(rows, key=lambda r: r.tokens_per_s, default=None)
    if best is None or best.engine != AUTO_ENGINE:
        return plain()
    rt = open_onnx(t, key, build=False)
    if rt is None:
        return plain()
    torch_row = max((r for r in rows if r.engine == "torch"), key=lambda r: r.tokens_per_s, default=None)
    vs = f" vs {torch_row.tokens_per_s:.0f} on torch" if torch_row else ""
    log(f"engine: {AUTO_ENGINE} (measured faster for {best.name} here: {best.tokens_per_s:.0f} tok/s{vs})")
    return rt


@dataclasses.dataclass
class Auto:
    """What `load_auto` resolved: the runtime to use, the row it runs, the reason and the table (None
    while unmeasured); `measuring` resolves to the measured `Auto` when a background calibration runs."""

    runtime: object
    row: Row
    reason: str
    table: Table | None
    measuring: concurrent.futures.Future | None = None
    stop: threading.Event | None = None  # set it to end a background calibration early

    def stop_measuring(self, timeout: float = 3.0) -> bool:
        """Ask a background calibration to stop after its current measurement and wait up to `timeout`
        seconds; False while it is still running (an engine build finishes what it started)."""
        if self.measuring is None or self.measuring.done():
            return True
        self.stop.set()
        try:
            self.measuring.exception(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True


def default_row(rt) -> Row:
    """What auto runs before this machine is measured: AR on a CPU (where a pass costs about what its
    tokens cost, so drafting rarely pays), LinearSpec on a GPU (a pass of B tokens costs about one of 1)."""
    return Row(rt.engine, "ar" if rt.device.type == "cpu" else "linear-spec", None, 0.0, 0.0)


def load_auto(a: argparse.Namespace, *, log: Callable[[str], None] = say,
              progress: Callable[[str, int, int], None] | None = None, recalibrate: bool = False,
              check: Callable[[object], None] | None = None, measure: str = "now", runtime=None) -> Auto:
    """Load the model for `--mode auto` and pick engine, mode and steps from this machine's table.

    With no table yet, `measure` says what happens: "now" calibrates first (a minute on a laptop; a
    power budget or `--prefer energy` always needs it), "background" answers at once with `default_row`
    and calibrates in a thread (`Auto.measuring`; each measurement waits for the request in flight),
    "never" uses the default and says how to measure. `check(runtime)` validates the request before
    any calibration (a bad request fails fast, alone). `runtime`: the model already loaded with these
    options, reused instead of loading it again."""
    from edge_dlm import engines

    check_preferences(a.prefer, a.power_budget)
    t = target(a)
    key = table_key(t)
    loaded = engines.select(t.engine, t.path, t.device)
    table = None if recalibrate else load_table(key)
    rt = runtime
    if table is None:
        rt = rt or load_runtime(a)
        if check is not None:
            check(rt)
        if measure != "now" and a.power_budget is None and a.prefer != "energy":
            row = default_row(rt)
            if measure == "never":
                return Auto(rt, row, f"auto: {row.name} on {rt.engine} (the default: this machine is not measured "
                            "yet; `edge-dlm calibrate` measures it once, chat does it while you read)", None)
            pending: concurrent.futures.Future = concurrent.futures.Future()
            stop = threading.Event()

            def measure_in_background() -> None:
                try:
                    calibrate(rt, t, progress=progress, key=key, cancel=stop)
                    pending.set_result(load_auto(a, log=log, check=check, measure="now", runtime=rt))
                except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
                    pending.set_exception(exc)

            threading.Thread(target=measure_in_background, name="edge-dlm-calibrate", daemon=True).start()
            return Auto(rt, row, f"auto: {row.name} on {rt.engine} for now (measuring this machine in the "
                        "background, once; later answers use what it finds)", None, pending, stop)
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


def before_exit(auto: Auto | None) -> None:
    """End a background calibration before the interpreter does (a thread inside torch at exit aborts
    the process): it stops after its current measurement; one still building an engine after a few
    seconds is abandoned with the process (the half-built engine is tidied by the next build)."""
    if auto is not None and not auto.stop_measuring():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
