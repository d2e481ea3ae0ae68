"""The chat app driven by Pilot on a tiny model: stream, switch mode, stop, reopen, snapshots."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytest.importorskip("textual")

from helpers import FakeMeter, fake_power_supply  # noqa: E402

from edge_dlm.tui.app import ChatApp, Message  # noqa: E402
from edge_dlm.tui.store import Store  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def runtime(tiny_ckpt):
    import edge_dlm

    return edge_dlm.load(tiny_ckpt, device="cpu")


def make_app(runtime, tmp_path, **kw) -> ChatApp:
    """The app with a fake meter (none) and a fake power supply on AC: the power line is the same anywhere."""
    from edge_dlm.primitives.power import Monitor, PowerSupply

    kw.setdefault("monitor", Monitor("cpu", FakeMeter(None), PowerSupply(fake_power_supply(tmp_path / "ps", ac=True))))
    kw.setdefault("poll_s", 3600)
    return ChatApp(runtime=runtime, store=Store(tmp_path / "chats.sqlite3"), **kw)


async def wait_idle(app: ChatApp, pilot, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        await pilot.pause(0.05)
        if not app.generating:
            return
    raise AssertionError("generation did not finish")


async def send(app: ChatApp, pilot, text: str) -> None:
    app.query_one("#prompt").focus()
    for ch in text:
        await pilot.press(ch if ch != " " else "space")
    await pilot.press("enter")
    await pilot.pause(0.05)


def test_send_switch_mode_and_reopen(runtime, tmp_path):
    async def scenario():
        app = make_app(runtime, tmp_path, mode="ar", max_new_tokens=12)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(app, pilot, "hello")
            await wait_idle(app, pilot)
            assert app.last_result.mode == "ar" and app.last_result.output_ids
            msgs = list(app.query(Message))
            assert len(msgs) == 2 and app.history[-1]["content"] == app.last_result.text
            model_before = app.runtime.model
            # switch to diffusion with 2 steps, no reload
            app.query_one("#mode").value = "diffusion"
            app.query_one("#steps").value = 2
            await send(app, pilot, "again")
            await wait_idle(app, pilot)
            assert app.last_result.mode == "diffusion" and app.runtime.model is model_before
            assert "diffusion" in str(app.query_one("#status").render())
            conv = app.conversation
        saved = Store(tmp_path / "chats.sqlite3")
        assert [m["role"] for m in saved.messages(conv)] == ["user", "assistant", "user", "assistant"]
        # reopen it in a fresh app
        app2 = make_app(runtime, tmp_path)
        async with app2.run_test(size=(100, 30)) as pilot:
            await pilot.press("ctrl+o")
            await pilot.pause(0.1)
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app2.conversation == conv and len(list(app2.query(Message))) == 4

    asyncio.run(scenario())


class SlowModel:
    """The model with 20 ms passes, so an answer is still running when a key arrives."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *a, **k):
        import time

        time.sleep(0.02)
        return self.model(*a, **k)


def test_stop_generation(tiny_ckpt, tmp_path):
    import edge_dlm

    slow = edge_dlm.load(tiny_ckpt, device="cpu")
    slow.model = SlowModel(slow.model)

    async def scenario():
        app = make_app(slow, tmp_path, mode="ar", max_new_tokens=3000)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(app, pilot, "go")
            await pilot.pause(0.3)
            await pilot.press("escape")
            await wait_idle(app, pilot)
            assert app.last_result.finish_reason == "cancelled"
            assert len(app.last_result.output_ids) < 3000
            assert "(stopped)" in app.query(Message).last().source  # marked as stopped

    asyncio.run(scenario())


def test_presets_set_mode_and_steps(runtime, tmp_path):
    async def scenario():
        app = make_app(runtime, tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f2")
            await pilot.pause(0.1)
            assert app.query_one("#mode").value == "diffusion" and app.query_one("#steps").value == 2
            assert "energy" in str(app.query_one("#preset-trade").render())
            await pilot.press("f4")
            await pilot.pause(0.1)
            assert app.query_one("#mode").value == "linear-spec"

    asyncio.run(scenario())


async def settle(app: ChatApp, pilot) -> None:
    """Wait until the footer's key bindings have rendered (they mount asynchronously)."""
    from textual.widgets import Footer

    for _ in range(100):
        await pilot.pause(0.05)
        if len(app.query_one(Footer).children) >= len(app.BINDINGS):
            break
    await pilot.pause(0.1)


def snapshot(app: ChatApp, name: str) -> None:
    svg = app.export_screenshot()
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("UPDATE_SNAPSHOTS") or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        if not os.environ.get("UPDATE_SNAPSHOTS"):
            pytest.fail(f"snapshot {path.name} was missing and has been written; rerun")
    assert svg == path.read_text(encoding="utf-8"), f"{name} differs from {path} (UPDATE_SNAPSHOTS=1 to accept)"


def test_snapshot_main_screen(runtime, tmp_path):
    async def scenario():
        app = make_app(runtime, tmp_path, mode="linear-spec")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            app.set_status("linear-spec │ - tok/s │ TPF - │ NFE - │ cpu float32")  # memory varies
            await settle(app, pilot)
            snapshot(app, "main_screen")

    asyncio.run(scenario())


def test_snapshot_block_view(runtime, tmp_path):
    from edge_dlm.tui.render import render_block

    async def scenario():
        app = make_app(runtime, tmp_path, mode="diffusion")
        async with app.run_test(size=(80, 24)) as pilot:
            labels = ["def", " f", "(", "", "", ")", ":", ""]
            masked = [False, False, False, True, True, False, False, True]
            app.query_one("#block").update(render_block(labels, masked, fresh={5, 6}))
            app.set_status("diffusion │ - tok/s │ TPF - │ NFE 3 │ cpu float32")
            await settle(app, pilot)
            snapshot(app, "block_view")

    asyncio.run(scenario())


def test_regenerate_replaces_the_last_answer(runtime, tmp_path):
    async def scenario():
        app = make_app(runtime, tmp_path, mode="diffusion", max_new_tokens=10, temperature=1.0)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(app, pilot, "hello")
            await wait_idle(app, pilot)
            first = app.last_result
            await pilot.press("ctrl+r")
            await pilot.pause(0.05)
            await wait_idle(app, pilot)
            assert [m["role"] for m in app.history] == ["user", "assistant"]
            assert app.last_result is not first and app.last_result.mode == "diffusion"
            assert len(list(app.query(Message))) == 2
            saved = app.store.messages(app.conversation)
            assert [m["id"] for m in saved] == [m["id"] for m in app.history]

    asyncio.run(scenario())


def test_power_line_and_budget(runtime, tmp_path):
    from edge_dlm.session.calibrate import Row, Table

    measured = Table("k", [Row("torch", "ar", None, 100.0, 1.0, 8.0, 0.08),
                           Row("torch", "linear-spec", None, 150.0, 2.5, 14.0, 0.09),
                           Row("torch", "diffusion", 2, 400.0, 5.0, 12.0, 0.03)], {"energy": "fake"})

    async def scenario():
        app = make_app(runtime, tmp_path, mode="linear-spec", table=measured)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            power = str(app.query_one("#power").render())
            assert "W n/a (no meter in this test)" in power and "AC" in power and "no budget" in power
            budget = app.query_one("#budget")
            budget.value = "13"
            budget.focus()
            await pilot.press("enter")
            await pilot.pause(0.1)
            # the fastest measured configuration within 13 W (lossy allowed in the app: the panel shows it)
            assert app.query_one("#mode").value == "diffusion" and app.query_one("#steps").value == 2
            assert "within 13 W" in str(app.query_one("#preset-trade").render())
            assert "budget 13 W" in str(app.query_one("#power").render())
            budget.value = "5"
            await pilot.press("enter")
            await pilot.pause(0.1)
            assert "no configuration for this budget" in str(app.query_one("#status").render())
            note = [n.message for n in app._notifications][-1]  # the whole reason, in the screen's words
            assert "no configuration fits 5 W" in note and "--" not in note
            # an answer's energy: J/token of the last answer on the power line
            app.monitor.meter.watts = 30.0
            app.monitor.meter.source = "fake"
            app.query_one("#mode").value = "ar"
            await send(app, pilot, "hi")
            await wait_idle(app, pilot)
            assert app.joules_per_token is not None and app.joules_per_token > 0
            assert "J/token last answer" in str(app.query_one("#power").render())

    asyncio.run(scenario())


def test_on_battery_it_switches_to_the_battery_preset_and_back(runtime, tmp_path):
    from edge_dlm.primitives.power import Monitor, PowerSupply

    ps = fake_power_supply(tmp_path / "ps", ac=True)

    async def scenario():
        app = make_app(runtime, tmp_path, mode="linear-spec", poll_s=0.05,
                       monitor=Monitor("cpu", FakeMeter(None), PowerSupply(ps)))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            assert app.query_one("#mode").value == "linear-spec"
            fake_power_supply(ps, ac=False, battery="Discharging", power_uw=9_000_000)  # unplugged
            await pilot.pause(0.4)
            assert app.query_one("#mode").value == "diffusion" and app.query_one("#steps").value == 2
            power = str(app.query_one("#power").render())
            assert "battery (battery preset)" in power and "9.0 W now" in power
            assert any("On battery" in n.message for n in app._notifications)
            fake_power_supply(ps, ac=True, battery="Charging")  # plugged in again
            await pilot.pause(0.4)
            assert app.query_one("#mode").value == "linear-spec" and "AC" in str(app.query_one("#power").render())

    asyncio.run(scenario())


def test_snapshot_power_line(runtime, tmp_path):
    async def scenario():
        app = make_app(runtime, tmp_path, mode="linear-spec", power_budget=15)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            app.watts, app.joules_per_token, app.supply = 11.4, 0.042, "battery"
            app.show_power()
            app.set_status("linear-spec │ 212.0 tok/s │ TPF 2.31 │ NFE 26 │ acc 2.62 │ cpu float32")
            await settle(app, pilot)
            snapshot(app, "power_line")

    asyncio.run(scenario())
