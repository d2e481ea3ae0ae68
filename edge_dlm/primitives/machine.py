"""What machine this is, in one line (calibration keys, bench tables, doctor), and how many CPU threads
a pass should use."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def machine_description(device: str, threads: int | None = None) -> str:
    """The device (GPU name, or CPU model and cores), torch's version and the CPU threads passes use
    (`threads`, default: torch's current setting)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads for CPU passes when nothing says otherwise: half the logical CPUs this process
    may use (about the physical cores on SMT machines), at least 1.

    torch's own default takes every core, and its parallel regions then collapse when anything else
    runs (the chat screen, a terminal, a browser): measured back to back on a busy 2-core machine, AR
    on the demo model ran at 17-33 tok/s with 2 threads against 254-403 with 1. One core left free costs
    little when the machine is idle (1231-1324 vs 1186-1309 tok/s, 1 vs 2 threads, same machine idle).
    `edge-dlm calibrate` measures the choice on the machine (`measured_threads`).
    """
    return max(1, usable_cpus() // 2)


def _threads_file() -> Path:
    from edge_dlm.primitives.fsutil import cache_root

    return cache_root() / "threads.json"


def _cpu_key() -> str:
    return f"{cpu_name()}, {usable_cpus()} usable CPUs"


def measured_threads() -> dict | None:
    """What `edge-dlm calibrate` measured on this machine: {"threads": best, "tokens_per_s":
    {threads: [idle, busy]}} (None: not measured, or another machine / CPU set)."""
    import json

    try:
        got = json.loads(_threads_file().read_text()).get(_cpu_key())
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(got, dict) or not isinstance(got.get("threads"), int) or not 1 <= got["threads"] <= usable_cpus():
        return None
    return got


def record_threads(best: int, tokens_per_s: dict[int, list[float]]) -> None:
    """Keep `best` as this machine's threads for passes (`threads_for` uses it from now on)."""
    import json

    from edge_dlm.primitives.fsutil import write_cache

    path = _threads_file()
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[_cpu_key()] = {"threads": best, "tokens_per_s": {str(k): v for k, v in tokens_per_s.items()}}
    write_cache(path, json.dumps(data, indent=2).encode(), "the measured thread count")


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads to `threads_for(n)` and return it."""
    import torch

    n = threads_for(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def threads_for(n: int | None) -> int:
    """The CPU threads passes use: `n`, else $EDGE_DLM_THREADS, else what `edge-dlm calibrate` measured
    here (`measured_threads`), else `default_threads()` (checked)."""
    from edge_dlm.primitives.errors import UserError

    if n is None:
        env = os.environ.get("EDGE_DLM_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise UserError(f"EDGE_DLM_THREADS must be a positive integer, got {env!r}")
            n = int(env)
    if n is None:
        got = measured_threads()
        n = got["threads"] if got else default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise UserError(f"--threads must be a positive integer, got {n!r}")
    return n
