"""Energy and power: what this machine can measure, and nothing made up.

- `EnergyMeter(device)`: cumulative joules from NVML (NVIDIA GPU: total energy counter) or the Linux
  powercap RAPL counters (CPU package), whichever is readable; `read()` is None and `why` says why
  when neither is.
- `PowerSupply(root)`: AC or battery, and the battery's discharge rate in watts, from the OS power
  supply interface (`/sys/class/power_supply` on Linux): on a laptop with neither NVML nor RAPL the
  discharge rate while decoding is the only energy measure there is.
- `Sampler`: wraps a generation; gives average watts and joules from whichever source exists.

Roots are parameters so tests can use a fake sysfs tree.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

POWERCAP = Path("/sys/class/powercap")
POWER_SUPPLY = Path("/sys/class/power_supply")


class EnergyMeter:
    """Joules from NVML (GPU) or RAPL (CPU package); `read()` is None when neither is readable."""

    def __init__(self, device: str, powercap: Path | None = None) -> None:
        powercap = powercap or POWERCAP
        self.source = "n/a"
        self.why = ""
        self._read: Callable[[], float] | None = None
        if str(device).startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                index = int(str(device).partition(":")[2] or 0)  # cuda:N, else the first GPU
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
                self.source = "NVML"
            except ImportError:
                self.why = "NVML needs nvidia-ml-py (pip install nvidia-ml-py)"
            except Exception as exc:  # pynvml raises NVMLError subclasses of Exception
                self.why = f"NVML has no energy counter here ({str(exc)[:60]})"
            return
        # packages only (intel-rapl:N); their sub-domains (intel-rapl:N:M) are already inside them
        files = sorted(f for f in powercap.glob("intel-rapl:*/energy_uj")
                       if f.parent.name.count(":") == 1 and f.parent.name.split(":")[1].isdigit())
        if not files:
            self.why = f"no RAPL counters: {powercap} has none"
            return
        try:
            for f in files:
                int(f.read_text())
        except (OSError, ValueError) as exc:
            self.why = f"RAPL counters are not readable ({type(exc).__name__}; they need root on most systems)"
            return
        self._read = lambda: sum(int(f.read_text()) for f in files) / 1e6
        self.source = "RAPL"

    def read(self) -> float | None:
        return self._read() if self._read else None


@dataclasses.dataclass(frozen=True)
class SupplyState:
    on_battery: bool | None  # None: no battery or AC adapter reported
    discharge_w: float | None  # battery discharge rate, when discharging and reported
    why: str = ""  # why discharge_w is None

    @property
    def label(self) -> str:
        return "battery" if self.on_battery else "AC" if self.on_battery is False else "n/a"


class PowerSupply:
    """The OS power supply interface: AC online, battery status and its power draw."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or POWER_SUPPLY

    def _read(self, d: Path, name: str) -> str | None:
        try:
            return (d / name).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def state(self) -> SupplyState:
        if not self.root.is_dir():
            return SupplyState(None, None, f"no {self.root}")
        ac_online, batteries = None, []
        for d in sorted(self.root.iterdir()):
            kind = self._read(d, "type")
            if kind == "Mains":
                ac_online = (ac_online or False) or self._read(d, "online") == "1"
            elif kind == "Battery":
                batteries.append(d)
        if not batteries:
            return SupplyState(False if ac_online else None, None, "no battery")
        statuses = [self._read(b, "status") for b in batteries]
        discharging = any(s == "Discharging" for s in statuses)
        on_battery = discharging or (ac_online is False)
        if not discharging:
            return SupplyState(on_battery, None, "the battery is not discharging (on AC)")
        watts = 0.0
        for b in batteries:
            power = self._read(b, "power_now")  # microwatts
            if power is not None and power.lstrip("-").isdigit():
                watts += abs(int(power)) / 1e6
                continue
            cur, volt = self._read(b, "current_now"), self._read(b, "voltage_now")  # microamps, microvolts
            if cur and volt and cur.lstrip("-").isdigit() and volt.isdigit():
                watts += abs(int(cur)) * int(volt) / 1e12
            else:
                return SupplyState(on_battery, None, "the battery reports no power_now or current_now")
        return SupplyState(on_battery, watts)


@dataclasses.dataclass
class Reading:
    """Energy of one measured stretch: joules and average watts, or None with the reason."""

    joules: float | None
    watts: float | None
    source: str
    why: str = ""


class Sampler:
    """Measure energy across a stretch of work: `start()`, then `stop()` -> `Reading`.

    A cumulative counter (NVML, RAPL) gives joules directly; otherwise the battery's discharge rate,
    sampled at start and stop, gives watts (and joules = watts x time). Otherwise n/a, with the reason.
    """

    def __init__(self, device: str, meter: EnergyMeter | None = None, supply: PowerSupply | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.meter = meter or EnergyMeter(device)
        self.supply = supply or PowerSupply()
        self.clock = clock  # seconds; tests give the meter and the sampler one fake clock
        self._t0 = self._e0 = None
        self._w0: float | None = None

    @property
    def source(self) -> str:
        if self.meter.source != "n/a":
            return self.meter.source
        return "battery" if self.supply.state().discharge_w is not None else "n/a"

    @property
    def label(self) -> str:
        """The source, or "n/a (why)"."""
        source = self.source
        return source if source != "n/a" else f"n/a ({self.meter.why or self.supply.state().why})"

    def start(self) -> None:
        self._t0 = self.clock()
        self._e0 = self.meter.read()
        self._w0 = None if self._e0 is not None else self.supply.state().discharge_w

    def stop(self) -> Reading:
        t1 = self.clock()
        dt = max(t1 - (t1 if self._t0 is None else self._t0), 1e-9)
        e1 = self.meter.read()
        if self._e0 is not None and e1 is not None:
            j = max(e1 - self._e0, 0.0)
            return Reading(j, j / dt, self.meter.source)
        state = self.supply.state()
        if self._w0 is not None and state.discharge_w is not None:
            w = (self._w0 + state.discharge_w) / 2
            return Reading(w * dt, w, "battery")
        return Reading(None, None, "n/a", self.meter.why + ("; " + state.why if state.why else ""))


class Monitor:
    """Live power for a status line: `poll()` -> (watts since the last poll or None, SupplyState, why).

    With a counter (NVML, RAPL) the watts are the energy since the previous poll over the time since
    it; otherwise the battery's discharge rate while on battery; otherwise None and the reason.
    """

    def __init__(self, device: str, meter: EnergyMeter | None = None, supply: PowerSupply | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.meter = meter or EnergyMeter(device)
        self.supply = supply or PowerSupply()
        self.clock = clock
        self._last: tuple[float, float] | None = None

    def poll(self) -> tuple[float | None, SupplyState, str]:
        state = self.supply.state()
        t, e = self.clock(), self.meter.read()
        if e is not None:
            last, self._last = self._last, (t, e)
            if last is None or t <= last[0]:
                return None, state, "measuring"
            return max(e - last[1], 0.0) / (t - last[0]), state, ""
        if state.discharge_w is not None:
            return state.discharge_w, state, ""
        return None, state, self.meter.why
