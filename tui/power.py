"""The chat screen's power side (a part of `ChatApp`): the power line (watts now, J/token, AC or battery,
the budget), the switch to the battery preset on battery and back on AC, and a power budget applied
through the calibration table (calibrating first where the model has none)."""

from __future__ import annotations

from textual import work
from textual.widgets import Input, Select, Static

from edge_dlm.tui.render import power_line
from edge_dlm.tui.widgets import Line


class PowerPanel:
    """`ChatApp`'s power methods; they use its widgets (`#power`, `#mode`, `#steps`, `#threshold`,
    `#preset`) and state (`monitor`, `table`, `budget`, `on_battery`, ...)."""

    def apply_budget(self, budget: float) -> None:
        from edge_dlm.session.calibrate import choose
        from edge_dlm.primitives.errors import UserError

        try:
            row, reason = choose(self.table, power_budget=budget, allow_lossy=True,
                                 engines={self.runtime.engine})
        except UserError as exc:  # in the screen's words (no CLI flags), whole, where it is not cut
            msg = str(exc).replace("--power-budget", "the budget").replace("drop the budget", "clear the field")
            self.set_status("error: no configuration for this budget (see the message)")
            self.notify(msg, title="Power budget", severity="error", timeout=10)
            return
        self.budget = budget
        self.apply_choice(row, reason)
        self.poll_power()

    @work(thread=True, exclusive=True, group="calibrate")
    def calibrate_then(self, budget: float) -> None:
        from edge_dlm.session.calibrate import calibrate, runtime_target, target

        t = target(self.load_args) if self.load_args is not None else runtime_target(self.runtime)
        self.table = calibrate(self.runtime, t, progress=lambda label, i, n: self.call_from_thread(
            self.set_status, f"calibrating ({i}/{n}): {label}"))
        self.call_from_thread(self.apply_budget, budget)
        self.call_from_thread(self.show_stats)

    def poll_power(self) -> None:
        if self.monitor is None or not self.query("#power"):  # not yet mounted, or already torn down
            return
        self.watts, state, self.watts_why = self.monitor.poll()
        self.supply = state.label
        if state.on_battery and not self.on_battery:
            self.on_battery = True
            self.before_battery = self.current_panel()
            self.action_preset("battery")
            self.notify("On battery: switched to the battery preset (diffusion, 2 steps per block). "
                        "F4 for AR's exact text.", title="Power")
        elif self.on_battery and state.on_battery is False:
            self.on_battery = False
            if self.before_battery is not None:
                self.restore_panel(self.before_battery)
                self.before_battery = None
            self.notify("On AC again: your settings are back.", title="Power")
        self.show_power()

    def show_power(self) -> None:
        if not self.query("#power"):
            return
        self.query_one("#power", Line).update(power_line(
            watts=self.watts, why=self.watts_why, joules_per_token=self.joules_per_token, supply=self.supply,
            budget=self.budget, preset="battery" if self.on_battery else None))

    def current_panel(self) -> dict:
        return {"mode": self.query_one("#mode", Select).value, "steps": self.query_one("#steps", Select).value,
                "threshold": self.query_one("#threshold", Input).value}

    def restore_panel(self, panel: dict) -> None:
        self.query_one("#preset", Select).clear()
        self.query_one("#mode", Select).value = panel["mode"]
        self.query_one("#steps", Select).value = panel["steps"]
        self.query_one("#threshold", Input).value = panel["threshold"]
        self.query_one("#preset-trade", Static).update("")
