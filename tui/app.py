"""`edge-dlm chat`: a Textual chat app, a thin client of `Runtime.stream`.

The model loads and generates in thread workers; widgets hold no model logic. The side panel picks
mode, step budget, threshold, temperature and max tokens (or a preset that bundles them), the block
view shows masked positions filling in pass by pass (drafts accepted in green, rejected in red), and
the status line reports tokens/s, TPF, NFE, mean accepted length, device, dtype and memory.

Power: a line shows W now, J/token of the last answer, AC or battery and the budget. `--mode auto`
(the default) loads through the calibration table (`edge_dlm.session.calibrate`); the budget field picks the
fastest measured configuration within that many watts; on battery the app switches to the battery
preset by itself, says so, and switches back on AC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, Label, Select, Static

from edge_dlm.primitives.device import peak_memory_mb
from edge_dlm.session.calibrate import Stopped
from edge_dlm.tui.render import PRESETS, render_block, status_line
from edge_dlm.tui.power import PowerPanel
from edge_dlm.tui.store import Store
from edge_dlm.tui.widgets import Line, LiveReply, Message, OpenChat, displayed

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


class ChatApp(PowerPanel, App):
    TITLE = "edge-dlm"
    ENABLE_COMMAND_PALETTE = False  # its footer entry would push F4 off an 80-column footer
    CSS = """
    #main { height: 1fr; }
    #chat { width: 1fr; }
    #side { width: 30; border-left: solid $primary; padding: 0 1; }
    .-narrow #side { width: 24; }
    #side Label { margin-top: 1; color: $text-muted; }
    .-short #side Label { margin-top: 0; }
    #side Input { width: 100%; height: 1; border: none; padding: 0 1; background: $boost; }
    #side Select { width: 100%; height: auto; }
    #side Select > SelectCurrent { border: none; height: 1; padding: 0 1; background: $boost; }
    #preset-trade { height: auto; color: $text-muted; margin-top: 1; }
    #block { height: 3; border-top: solid $primary; padding: 0 1; }
    .-short #block { height: 2; }
    #status { background: $boost; }
    #power { color: $text-muted; }
    """
    # the layout tightens on an 80x24 terminal (Textual sets these classes on the screen by size)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]
    RENDER_HZ = 4  # how often a streaming reply is redrawn; decoding never waits for the screen
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Redo"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "open_chat", "Open"),
        Binding("f2", "preset('battery')", "Battery"),
        Binding("f3", "preset('balanced')", "Balanced"),
        Binding("f4", "preset('quality')", "Quality"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, *, runtime=None, load_args: argparse.Namespace | None = None,
                 store: Store | None = None, mode: str = "linear-spec", steps: int | None = None,
                 threshold: float = 0.9, temperature: float = 0.0, max_new_tokens: int = 200,
                 table=None, monitor=None, power_budget: float | None = None, poll_s: float = 2.0,
                 controls: dict | None = None) -> None:
        super().__init__()
        self.controls = dict(controls or {})  # stop sequences, penalties, a constraint: from the flags
        self.runtime = runtime
        self.table = table  # the calibration table (edge_dlm.session.calibrate), once known
        self.monitor = monitor  # edge_dlm.primitives.power.Monitor; None: made for the device once the model loads
        self.budget = power_budget
        self.poll_s = poll_s
        self.watts: float | None = None
        self.watts_why = ""
        self.supply = "n/a"
        self.on_battery = False
        self.before_battery: dict | None = None  # the settings the battery preset replaced
        self.joules_per_token: float | None = None
        self.load_args = load_args
        self.store = store or Store()
        self.init = dict(mode=mode, steps=steps, threshold=threshold, temperature=temperature,
                         max_new_tokens=max_new_tokens)
        self.conversation: int | None = None
        self.history: list[dict] = []  # {"id", "role", "content"}
        self.cancel = threading.Event()
        self.generating = False
        self.last_result = None
        self.live: tuple | None = None  # (version, text, block, nfe, mode): what the decode thread has, latest
        self.shown = 0  # the live version on screen
        self.streaming: LiveReply | None = None
        self.measured = None  # a background calibration's result, adopted between answers
        self.auto = None  # what --mode auto resolved (its background calibration, if one runs)
        self.applying_preset = False
    # ---- layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield Static("", id="block")
            with VerticalScroll(id="side"):
                yield Label("Mode")
                yield Select([(m, m) for m in MODES], value=self.init["mode"], allow_blank=False, id="mode")
                yield Label("Steps per block")
                steps = self.init["steps"]
                choices = sorted(set(range(1, 9)) | ({steps} if steps else set()))
                yield Select([(str(s), s) for s in choices], value=steps or 4, allow_blank=False, id="steps")
                yield Label("Threshold")
                yield Input(str(self.init["threshold"]), id="threshold")
                yield Label("Temperature")
                yield Input(str(self.init["temperature"]), id="temperature")
                yield Label("Max tokens")
                yield Input(str(self.init["max_new_tokens"]), id="max-tokens")
                yield Label("Preset (F2-F4)")
                yield Select([(p, p) for p in PRESETS], prompt="custom", id="preset")
                yield Label("Budget, W (Enter)")
                yield Input("" if self.budget is None else f"{self.budget:g}", placeholder="none", id="budget")
                yield Static("", id="preset-trade")
        yield Line("", id="power")
        yield Line("loading model…", id="status")
        yield Input(placeholder="Loading the model…", id="prompt", disabled=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.set_interval(1 / self.RENDER_HZ, self.render_live)
        self.new_conversation()
        if self.runtime is None:
            self.load_model()
        else:
            self.model_ready()

    @work(thread=True, exclusive=True, group="load")
    def load_model(self) -> None:
        from edge_dlm.session.load import load_runtime
        from edge_dlm.primitives.errors import UserError

        a = self.load_args
        try:
            if a.mode == "auto" and a.steps is None:
                from edge_dlm.session.load import load_auto

                auto = load_auto(a, log=lambda m: self.call_from_thread(self.set_status, m), measure="background")
                self.runtime, self.table, self.auto = auto.runtime, auto.table, auto
                self.call_from_thread(self.apply_choice, auto.row, auto.reason)
                if auto.measuring is not None:
                    auto.measuring.add_done_callback(lambda f: self.measured_in_background(f, auto.row))
            else:
                self.runtime = load_runtime(a, a.mode if a.mode != "auto" else "diffusion", a.steps,
                                            log=lambda m: self.call_from_thread(self.set_status, m))
        except UserError as exc:
            self.call_from_thread(self.set_status, f"error: {exc}")
            return
        self.call_from_thread(self.model_ready)

    def measured_in_background(self, future, default) -> None:
        """The calibration thread's callback: hand the result to the screen, unless the app has gone."""
        if self.is_running and not isinstance(future.exception(), Stopped):
            with contextlib.suppress(RuntimeError):  # the app closed meanwhile
                self.call_from_thread(self.measured_done, future, default)

    def measured_done(self, future, default) -> None:
        """The background calibration finished: adopt its choice now, or after the answer in flight."""
        try:
            self.measured = (future.result(), default)
        except Exception as exc:  # noqa: BLE001 (the chat goes on with what it runs)
            self.notify(f"auto: measuring failed ({exc}); keeping {default.name}", title="Auto")
            return
        if not self.generating:
            self.adopt_measured()

    def adopt_measured(self) -> None:
        if self.measured is None:
            return
        auto, default = self.measured
        self.measured = None
        self.table = auto.table
        if self.query_one("#mode", Select).value != default.mode:  # the user chose meanwhile: keep it
            self.notify(f"measured: {auto.reason}", title="Auto")
            return
        self.runtime = auto.runtime
        self.apply_choice(auto.row, auto.reason)
        self.sub_title = f"{self.runtime.name} · {self.runtime.device} · {self.runtime.engine} · " \
                         f"B={self.runtime.config.block_size}"
        self.show_stats()

    def model_ready(self) -> None:
        rt = self.runtime
        self.sub_title = f"{rt.name} · {rt.device} · {rt.engine} · B={rt.config.block_size}"
        if self.monitor is None:
            from edge_dlm.primitives.power import Monitor

            self.monitor = Monitor(str(rt.device))
        self.poll_power()
        self.set_interval(self.poll_s, self.poll_power)
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.placeholder = "Message (Enter to send)"
        prompt.focus()
        self.show_stats()

    # ---- settings
    def settings(self) -> dict:
        """The request options from the side panel; raises ValueError with a readable message."""
        mode = self.query_one("#mode", Select).value
        steps = self.query_one("#steps", Select).value
        try:
            threshold = float(self.query_one("#threshold", Input).value)
            temperature = float(self.query_one("#temperature", Input).value)
            max_new = int(self.query_one("#max-tokens", Input).value)
        except ValueError:
            raise ValueError("threshold and temperature must be numbers, max tokens an integer") from None
        block = self.runtime.config.block_size
        return dict(mode=mode, steps=min(steps, block) if mode == "diffusion" else None, threshold=threshold,
                    temperature=temperature, max_new_tokens=max_new, **self.controls)

    def apply_choice(self, row, reason: str) -> None:
        """Show a configuration auto (or the budget) chose in the side panel (the choice) and as a
        notification (the whole reason: it does not fit a 24-column panel)."""
        self.query_one("#mode", Select).value = row.mode
        if row.steps is not None:
            self.query_one("#steps", Select).value = row.steps
        self.query_one("#preset-trade", Static).update(reason if len(reason) <= 66 else reason[:65] + "…")
        self.notify(reason, title="Auto", timeout=5)

    @on(Input.Submitted, "#budget")
    def budget_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        try:
            budget = float(text) if text else None
        except ValueError:
            self.set_status("error: the power budget is a number of watts (empty: none)")
            return
        if budget is None:
            self.budget = None
            self.query_one("#preset-trade", Static).update("no power budget")
            self.poll_power()
            return
        if self.table is None:
            self.set_status("calibrating: a budget needs each mode's measured watts (once per model and machine)…")
            self.calibrate_then(budget)
            return
        self.apply_budget(budget)

    def action_preset(self, name: str) -> None:
        """Apply a preset (a key works whatever the panel shows, also after a change by hand)."""
        self.apply_preset(name)
        self.query_one("#preset", Select).value = name

    @on(Select.Changed, "#preset")
    def preset_changed(self, event: Select.Changed) -> None:
        if event.value in PRESETS:
            self.apply_preset(event.value)

    def apply_preset(self, name: str) -> None:
        p = PRESETS[name]
        self.applying_preset = True
        self.query_one("#mode", Select).value = p.mode
        if p.steps is not None:
            self.query_one("#steps", Select).value = p.steps
        self.query_one("#threshold", Input).value = str(p.threshold)
        self.query_one("#preset-trade", Static).update(p.trade)
        self.call_after_refresh(setattr, self, "applying_preset", False)  # after the Changed events it caused

    @on(Select.Changed, "#mode")
    @on(Select.Changed, "#steps")
    @on(Input.Changed, "#threshold")
    def setting_changed_by_hand(self, event) -> None:
        """A setting changed by hand: the panel no longer shows a preset."""
        preset = self.query_one("#preset", Select)
        if self.applying_preset or preset.value not in PRESETS:
            return
        p = PRESETS[preset.value]
        now = self.current_panel()
        if (now["mode"], str(now["threshold"])) != (p.mode, str(p.threshold)) or \
                (p.steps is not None and now["steps"] != p.steps):
            preset.clear()
            self.query_one("#preset-trade", Static).update("custom settings")

    # ---- conversation
    def new_conversation(self) -> None:
        self.conversation = None  # created lazily on the first message
        self.history = []
        self.query_one("#messages").remove_children()
        self.query_one("#block", Static).update("")

    def add_message_widget(self, role: str, content: str) -> Message:
        widget = Message(displayed(content) or " ", classes=role)
        msgs = self.query_one("#messages", VerticalScroll)
        msgs.mount(widget)
        msgs.scroll_end(animate=False)
        msgs.anchor()  # follow what grows at the end, until the user scrolls up
        return widget

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.generating or self.runtime is None:
            return
        event.input.value = ""
        if self.conversation is None:
            self.conversation = self.store.new_conversation(text[:60])
        mid = self.store.add_message(self.conversation, "user", text)
        self.history.append({"id": mid, "role": "user", "content": text})
        self.add_message_widget("user", text)
        self.start_answer()

    def start_answer(self) -> None:
        try:
            opts = self.settings()
        except ValueError as exc:
            self.set_status(f"error: {exc}")
            return
        mid = self.store.add_message(self.conversation, "assistant", "")
        entry = {"id": mid, "role": "assistant", "content": ""}
        widget = LiveReply("…")
        msgs = self.query_one("#messages", VerticalScroll)
        msgs.mount(widget)
        msgs.scroll_end(animate=False)
        msgs.anchor()
        self.cancel.clear()
        self.generating = True
        self.streaming, self.live, self.shown = widget, None, 0
        self.generate([{"role": m["role"], "content": m["content"]} for m in self.history], opts, entry, widget)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, messages: list[dict], opts: dict, entry: dict, widget: LiveReply) -> None:
        """Decode in this worker thread. It never waits for the screen: it leaves the latest text and
        block in `self.live`, and the screen redraws from there `RENDER_HZ` times a second."""
        from edge_dlm.decoding import Canvas, Done, Draft, Emit
        from edge_dlm.primitives.errors import UserError
        from edge_dlm.runtime import Text

        rt = self.runtime
        text: list[str] = []
        last_save = time.monotonic()
        mask = rt.config.mask_token_id
        result = None
        block, nfe, version = None, 0, 0
        sampler = self.sampler()
        try:
            for ev in rt.stream(messages, cancel=self.cancel, **opts):
                if isinstance(ev, Text):
                    text.append(ev.delta)
                    if time.monotonic() - last_save > 0.5:  # a kill loses at most half a second
                        self.store.update_message(entry["id"], "".join(text))
                        last_save = time.monotonic()
                elif isinstance(ev, Canvas):
                    block = (ev.tokens, mask, set(ev.committed), None)
                elif isinstance(ev, Draft):
                    block = (ev.tokens, None, set(), ev.accepted)
                elif isinstance(ev, Done):
                    result = ev.result
                if isinstance(ev, (Canvas, Draft, Emit)):
                    nfe = ev.nfe
                version += 1
                self.live = (version, text, block, nfe, opts["mode"])  # one reference swap: no lock needed
        except UserError as exc:
            self.call_from_thread(self.set_status, f"error: {exc}")
        if sampler is not None and result is not None:
            reading = sampler.stop()
            tokens = len(result.output_ids) + (result.finish_reason == "stop")
            self.joules_per_token = reading.joules / tokens if reading.joules is not None and tokens else None
        final = "".join(text)
        meta = json.dumps({k: getattr(result, k) for k in ("mode", "nfe", "tpf", "finish_reason")}) if result else None
        self.store.update_message(entry["id"], final, meta)
        entry["content"] = final
        self.history.append(entry)
        self.call_from_thread(self.answer_done, result, widget, final)

    def render_live(self) -> None:
        """Draw what the decode thread has produced since the last frame (a timer, on the screen's thread).
        While it streams the reply is plain text (Markdown is parsed once, at the end): a frame is
        cheap, so the screen takes little from the decoding."""
        live, widget = self.live, self.streaming
        if live is None or widget is None or live[0] == self.shown:
            return
        version, text, block, nfe, mode = live
        self.shown = version
        widget.update("".join(text))
        if block is not None:
            tokens, mask, fresh, accepted = block
            decode = self.runtime.tokenizer.decode
            labels = [decode([t]) if t != mask else "" for t in tokens]
            self.query_one("#block", Static).update(render_block(labels, [t == mask for t in tokens], fresh,
                                                                 accepted=accepted))
        self.show_live_nfe(nfe, mode)

    def sampler(self):
        """A started energy sampler over the monitor's meter and supply (None before the model loads)."""
        if self.monitor is None:
            return None
        from edge_dlm.primitives.power import Sampler

        s = Sampler(str(self.runtime.device), self.monitor.meter, self.monitor.supply)
        s.start()
        return s

    async def answer_done(self, result, widget: LiveReply, final: str) -> None:
        self.render_live()  # the last block and status
        self.generating, self.streaming = False, None
        stopped = result is not None and result.finish_reason == "cancelled"
        note = "*(stopped)*" if stopped else "*(no answer)*" if not final else ""
        message = Message(displayed(final) + ("\n\n" if final and note else "") + note, classes="assistant")
        await self.query_one("#messages", VerticalScroll).mount(message, after=widget)
        await widget.remove()
        self.last_result = result
        self.show_stats()
        self.show_power()
        self.adopt_measured()

    # ---- live views
    def show_live_nfe(self, nfe: int, mode: str) -> None:
        rt = self.runtime
        self.set_status(status_line(mode=mode, nfe=nfe, device=str(rt.device),
                                    dtype=rt.precision) + " │ generating…")

    def show_stats(self) -> None:
        rt, r = self.runtime, self.last_result
        mode = r.mode if r else self.query_one("#mode", Select).value
        self.set_status(status_line(
            mode=mode, tokens_per_s=r.tokens_per_s if r else None, tpf=r.tpf if r else None,
            nfe=r.nfe if r else None, mean_accepted=r.mean_accepted if r else None, device=str(rt.device),
            dtype=rt.precision, memory_mb=peak_memory_mb(rt.device)))

    def set_status(self, text: str) -> None:
        self.query_one("#status", Line).update(text)

    # ---- actions
    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()

    def action_regenerate(self) -> None:
        if self.generating or not self.history or self.history[-1]["role"] != "assistant":
            return
        last = self.history.pop()
        self.store.delete_message(last["id"])
        widgets = self.query(Message)
        if widgets:
            widgets.last().remove()
        self.start_answer()

    def action_new_chat(self) -> None:
        if not self.generating:
            self.new_conversation()

    def action_open_chat(self) -> None:
        if self.generating:
            return

        def opened(conv: int | None) -> None:
            if conv is None:
                return
            self.new_conversation()
            self.conversation = conv
            self.history = self.store.messages(conv)
            for m in self.history:
                self.add_message_widget(m["role"], m["content"])

        self.push_screen(OpenChat(self.store.conversations()), opened)


def run_app(args: argparse.Namespace, controls: dict | None = None) -> int:
    """The chat screen; `controls`: stop sequences, penalties, a constraint (from the CLI's flags)."""
    mode = "diffusion" if args.mode == "auto" and args.steps is not None else args.mode
    app = ChatApp(load_args=args, mode=mode if mode != "auto" else "linear-spec", steps=args.steps,
                  threshold=args.threshold, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                  power_budget=args.power_budget,
                  controls=controls)
    app.run()
    from edge_dlm.session.load import before_exit

    before_exit(app.auto)
    return 0
