"""Triton kernels: block attention over the KV cache, on-device verification and weight-only int4 /
int8 matmuls (edge_dlm.kernels).

Importing this package is light; `triton` loads with the kernel modules. `choice` is the one switch
for all of them (`--kernels`, $EDGE_DLM_KERNELS), `status(device)` says whether the Triton kernels can
run there and why not; a model's layers get them through `backend` (chosen and applied at load).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from edge_dlm.primitives.errors import install_hint

CHOICES = ("auto", "on", "off")
ENV = "EDGE_DLM_KERNELS"  # the switch's environment form: what `--kernels auto` (the default) becomes


def choice(value: str = "auto") -> str:
    """`--kernels value`, or $EDGE_DLM_KERNELS where the flag is left at auto; one switch for all of
    edge-dlm's own kernels: the C kernels on a CPU (`cpu_build`, `cpu_matmul`), the Triton ones on CUDA."""
    from edge_dlm.primitives.errors import UserError

    env = os.environ.get(ENV)
    if value == "auto" and env:
        value = env.strip().lower()
        if value not in CHOICES:
            raise UserError(f"{ENV}={env[:20]!r} not supported; known: {', '.join(CHOICES)}")
    if value not in CHOICES:
        raise UserError(f"--kernels {str(value)[:20]} not supported; known: {', '.join(CHOICES)}")
    return value


def cpu_resolve(value: str) -> bool:
    """Whether a CPU model runs the C kernels (`cpu_matmul`): auto where they build here, on insists
    (a one-line error where they cannot), off never."""
    from edge_dlm.kernels import cpu_build
    from edge_dlm.primitives.errors import UserError

    if value == "off":
        return False
    ok = not cpu_build.available() and cpu_build.usable()
    if value == "on" and not ok:
        why = (cpu_build.available() or [cpu_build.failure() or "they did not build"])[0]
        raise UserError(f"--kernels on, but the CPU kernels cannot run here: {why}; use --kernels auto or off")
    return ok


def status(device: torch.device | str) -> tuple[bool, list[str]]:
    """(usable, reasons it is not) for running the kernels on `device`."""
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append(f"triton is not installed ({install_hint('kernels')})")
    dev = torch.device(device)
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append(f"device {dev.type} is not CUDA (set TRITON_INTERPRET=1 to interpret them on CPU, slowly)")
    return not reasons, reasons


def resolve(choice: str, device: torch.device | str) -> bool:
    """Whether to use the kernels for `--kernels choice`; 'on' when they cannot run is a user error."""
    from edge_dlm.primitives.errors import UserError

    if choice not in CHOICES:
        raise UserError(f"--kernels {choice} not supported; known: {', '.join(CHOICES)}")
    ok, reasons = status(device)
    if choice == "on" and torch.device(device).type == "cpu" and not ok:
        return False  # on a CPU, `on` insists on the C kernels (`cpu_resolve`); Triton only interpreted
    if choice == "on" and not ok:
        raise UserError(f"--kernels on, but the kernels cannot run here: {'; '.join(reasons)}")
    if choice == "auto":  # never the (slow) interpreter unless asked for with "on"
        return ok and torch.device(device).type == "cuda"
    return choice == "on"
