"""Power meters, calibration and `--mode auto` (issue #17), with a fake meter and a fake power supply."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
from helpers import FakeMeter, Ticks, fake_power_supply

import edge_dlm
from edge_dlm.session import calibrate as cal
from edge_dlm.cli import main
from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.power import EnergyMeter, Monitor, PowerSupply, Sampler


# ---- meters and the power supply ----------------------------------------------------------------

def test_power_supply_reads_ac_battery_and_discharge(tmp_path):
    assert PowerSupply(tmp_path / "absent").state().on_battery is None
    ac = PowerSupply(fake_power_supply(tmp_path / "ac", ac=True)).state()
    assert ac.on_battery is False and ac.discharge_w is None and ac.label == "AC"
    charging = PowerSupply(fake_power_supply(tmp_path / "ch", ac=True, battery="Charging", power_uw=20_000_000))
    assert charging.state().on_battery is False and charging.state().discharge_w is None
    bat = PowerSupply(fake_power_supply(tmp_path / "b1", ac=False, battery="Discharging", power_uw=12_500_000))
    assert bat.state().on_battery and bat.state().discharge_w == pytest.approx(12.5) and bat.state().label == "battery"
    # no power_now: current x voltage (microamps x microvolts)
    cv = PowerSupply(fake_power_supply(tmp_path / "b2", ac=False, battery="Discharging", current_ua=1_000_000,
                                       voltage_uv=11_000_000))
    assert cv.state().discharge_w == pytest.approx(11.0)
    silent = PowerSupply(fake_power_supply(tmp_path / "b3", ac=False, battery="Discharging")).state()
    assert silent.on_battery and silent.discharge_w is None and "power_now" in silent.why


def test_rapl_meter_sums_packages_and_says_why_not(tmp_path):
    cap = tmp_path / "powercap"
    for i, uj in enumerate((1_500_000, 2_500_000)):
        (cap / f"intel-rapl:{i}").mkdir(parents=True)
        (cap / f"intel-rapl:{i}" / "energy_uj").write_text(f"{uj}\n")
    (cap / "intel-rapl:0:0").mkdir()  # a sub-domain, already inside package 0: not counted twice
    (cap / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")
    m = EnergyMeter("cpu", cap)
    assert m.source == "RAPL" and m.read() == pytest.approx(4.0)
    none = EnergyMeter("cpu", tmp_path / "empty")
    assert none.read() is None and "no RAPL counters" in none.why
    locked = tmp_path / "locked"
    (locked / "intel-rapl:0" / "energy_uj").mkdir(parents=True)  # unreadable as a file
    assert "not readable" in EnergyMeter("cpu", locked).why


def test_sampler_uses_the_counter_then_the_battery_then_says_na(tmp_path):
    clock = Ticks(0.05)
    s = Sampler("cpu", FakeMeter(20.0, clock), PowerSupply(tmp_path / "none"), clock=clock)
    s.start()
    r = s.stop()
    assert r.source == "fake" and r.watts == pytest.approx(20.0) and r.joules == pytest.approx(2.0)  # 0.1 s
    bat = fake_power_supply(tmp_path / "bat", ac=False, battery="Discharging", power_uw=8_000_000)
    s = Sampler("cpu", FakeMeter(None), PowerSupply(bat))
    s.start()
    r = s.stop()
    assert r.source == "battery" and r.watts == pytest.approx(8.0) and s.label == "battery"
    s = Sampler("cpu", FakeMeter(None), PowerSupply(fake_power_supply(tmp_path / "ac", ac=True)))
    s.start()
    r = s.stop()
    assert r.joules is None and r.watts is None and "no meter in this test" in r.why
    assert s.label.startswith("n/a (no meter")


def test_monitor_gives_watts_between_polls(tmp_path):
    clock = Ticks()
    m = Monitor("cpu", FakeMeter(7.0, clock), PowerSupply(tmp_path / "none"), clock=clock)
    assert m.poll()[0] is None  # the first poll has nothing to compare with
    w, state, _ = m.poll()
    assert w == pytest.approx(7.0) and state.on_battery is None
    bat = fake_power_supply(tmp_path / "bat", ac=False, battery="Discharging", power_uw=9_000_000)
    w, state, _ = Monitor("cpu", FakeMeter(None), PowerSupply(bat)).poll()
    assert w == pytest.approx(9.0) and state.on_battery


# ---- the auto rule ------------------------------------------------------------------------------

def table(*rows, energy: str = "fake") -> cal.Table:
    return cal.Table("k", [cal.Row(*r) for r in rows], {"energy": energy, "model": "m", "device": "cpu",
                                                         "machine": "test", "dtype": "float32", "created": "now"})


SPEEDS = table(("torch", "ar", None, 100.0, 1.0, 8.0, 0.08), ("torch", "linear-spec", None, 150.0, 2.5, 14.0, 0.093),
               ("torch", "quadratic-spec", None, 90.0, 2.9, 6.0, 0.067),
               ("torch", "diffusion", 2, 400.0, 5.0, 12.0, 0.03), ("torch", "diffusion", 1, 500.0, 8.0, 4.0, 0.008))


def test_auto_picks_the_fastest_lossless_mode():
    row, why = cal.choose(SPEEDS)
    assert (row.mode, row.steps) == ("linear-spec", None)
    assert why.startswith("auto: linear-spec on torch (fastest lossless") and "vs AR 100" in why
    assert cal.choose(SPEEDS, allow_lossy=True)[0].name == "diffusion S=1"
    assert cal.choose(SPEEDS, prefer="quality", allow_lossy=True)[0].mode == "linear-spec"  # quality: lossless only
    assert cal.choose(SPEEDS, prefer="energy")[0].mode == "quadratic-spec"  # lowest J/token of the lossless
    no_meter = table(("torch", "ar", None, 100.0, 1.0), ("torch", "linear-spec", None, 90.0, 1.7), energy="n/a")
    row, why = cal.choose(no_meter, prefer="energy")
    assert row.mode == "ar" and "no energy meter here" in why


def test_budget_picks_the_fastest_configuration_that_fits():
    assert cal.choose(SPEEDS, power_budget=10)[0].mode == "ar"  # linear-spec (14 W) does not fit
    assert cal.choose(SPEEDS, power_budget=20)[0].mode == "linear-spec"
    assert cal.choose(SPEEDS, power_budget=7)[0].mode == "quadratic-spec"
    row, why = cal.choose(SPEEDS, power_budget=5, allow_lossy=True)
    assert row.name == "diffusion S=1" and "within 5 W" in why and "4.0 W" in why
    with pytest.raises(UserError, match=r"no configuration fits 5 W: the lowest measured is quadratic-spec at 6.0 W; "
                       "--allow-lossy"):
        cal.choose(SPEEDS, power_budget=5)
    with pytest.raises(UserError, match="needs measured watts"):
        cal.choose(table(("torch", "ar", None, 100.0, 1.0), energy="n/a (no RAPL counters)"), power_budget=30)
    with pytest.raises(UserError, match="positive number of watts"):
        cal.choose(SPEEDS, power_budget=0)


def test_auto_chooses_among_the_engines_it_may_run():
    t = table(("torch", "ar", None, 100.0, 1.0), ("onnxruntime", "ar", None, 300.0, 1.0),
              ("onnxruntime", "linear-spec", None, 200.0, 1.5))
    row, why = cal.choose(t)
    assert (row.engine, row.mode) == ("onnxruntime", "ar") and "on onnxruntime" in why
    assert cal.choose(t, engines={"torch"})[0].engine == "torch"


# ---- calibration: measured, cached, keyed -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rt(tiny_ckpt):
    return edge_dlm.load(tiny_ckpt, device="cpu", engine="torch")


def test_calibration_measures_every_configuration_with_the_meter(tiny_rt):
    t = cal.runtime_target(tiny_rt)
    steps = []
    clock = Ticks()
    meter = Sampler("cpu", FakeMeter(12.0, clock), PowerSupply(Path("/nonexistent")), clock=clock)
    got = cal.calibrate(tiny_rt, t, sampler=meter,
                        max_new_tokens=6, n_prompts=2, progress=lambda label, i, n: steps.append((label, i, n)))
    names = [r.name for r in got.rows]
    assert names == ["ar", "linear-spec", "quadratic-spec", "diffusion S=1", "diffusion S=2", "diffusion S=4"]
    assert all(r.engine == "torch" and r.tokens_per_s > 0 and r.tpf > 0 for r in got.rows)
    assert all(r.watts == pytest.approx(12.0) and r.joules_per_token > 0 for r in got.rows)  # exact: one clock
    assert got.rows[0].tpf == 1.0 and got.meta["energy"] == "fake"
    assert steps[-1] == ("done", len(steps) - 1, len(steps) - 1)
    assert cal.load_table(cal.table_key(t)).to_json() == got.to_json()  # cached, read back the same
    assert "onnxruntime" in got.meta["not_measured"]  # a Runtime's own engine only
    assert "diffusion S=4" in got.format() and "12.0" in got.format()


def test_cache_key_changes_with_the_model_the_machine_and_the_options(tiny_ckpt, tmp_path):
    d = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    args = argparse.Namespace(model=str(d), device="cpu", dtype="auto", quant=None, group_size=64, no_lora=False,
                              kernels="auto", engine="auto")
    k0 = cal.table_key(cal.target(args))
    assert cal.table_key(cal.target(args)) == k0
    for change in ({"dtype": "bfloat16"}, {"quant": "int8"}, {"no_lora": True}, {"engine": "torch"}):
        assert cal.table_key(cal.target(argparse.Namespace(**{**vars(args), **change}))) != k0, change
    w = d / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten weights
    k1 = cal.table_key(cal.target(args))
    assert k1 != k0
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (d / "config.json").write_text(json.dumps(cfg))
    assert cal.table_key(cal.target(args)) != k1
    # a table of another format or key is not used
    f = cal.cache_file(k1)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({**SPEEDS.to_json(), "key": k1, "format": cal.FORMAT - 1}))
    assert cal.load_table(k1) is None
    f.write_text(json.dumps({**SPEEDS.to_json(), "key": k1}))
    assert cal.load_table(k1).rows == SPEEDS.rows
    f.write_text("{not json")
    assert cal.load_table(k1) is None


def test_an_identical_re_export_reuses_its_measurements(tiny_ckpt, tmp_path):
    """An artifact is keyed by what it is (its manifest), not by when or where it was written: exporting
    the same thing again, or elsewhere, keeps its calibration; another scheme does not."""
    from edge_dlm.cli import main as cli_main

    def key(path: Path) -> str:
        args = argparse.Namespace(model=str(path), device="cpu", dtype="auto", quant=None, group_size=64,
                                  no_lora=False, kernels="auto", engine="auto")
        return cal.table_key(cal.target(args))

    base = ["export", str(tiny_ckpt), "--quant", "int4", "--group-size", "32"]
    assert cli_main([*base, "-o", str(tmp_path / "a")]) == 0
    first = key(tmp_path / "a")
    assert cli_main([*base, "-o", str(tmp_path / "a"), "--force"]) == 0  # new files, new mtimes
    assert cli_main([*base, "-o", str(tmp_path / "b")]) == 0  # the same export, elsewhere
    assert key(tmp_path / "a") == first == key(tmp_path / "b")
    assert cli_main(["export", str(tiny_ckpt), "--quant", "int8", "--group-size", "32", "-o", str(tmp_path / "c")]) == 0
    assert key(tmp_path / "c") != first


# ---- the command line ---------------------------------------------------------------------------

def cli_key(model: Path, **over) -> str:
    args = argparse.Namespace(model=str(model), device="cpu", dtype="auto", quant=None, group_size=64,
                              no_lora=False, kernels="auto", engine="auto")
    return cal.table_key(cal.target(argparse.Namespace(**{**vars(args), **over})))


def write_table(key: str, t: cal.Table) -> None:
    f = cal.cache_file(key)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({**t.to_json(), "key": key}))


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_generate_auto_runs_what_the_table_says(tiny_ckpt, own_cache, capsys):
    write_table(cli_key(tiny_ckpt), table(("torch", "ar", None, 100.0, 1.0), ("torch", "linear-spec", None, 90.0, 1.5),
                                          ("torch", "quadratic-spec", None, 120.0, 1.9)))
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--prompt", "hi", "--json",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["mode"] == "quadratic-spec"
    assert "auto: quadratic-spec on torch (fastest lossless here; 120 tok/s vs AR 100)" in out.err
    # --steps with no --mode means diffusion, whatever the table says
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--prompt", "hi", "--json",
                 "--max-new-tokens", "6", "--steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "diffusion"


@pytest.mark.parametrize("rows,budget,needle", [
    ([("torch", "ar", None, 100.0, 1.0)], "10", "needs measured watts"),
    ([("torch", "ar", None, 100.0, 1.0, 30.0, 0.3), ("torch", "linear-spec", None, 90.0, 1.5, 25.0, 0.27)], "10",
     "no configuration fits 10 W: the lowest measured is linear-spec at 25.0 W"),
])
def test_a_budget_nothing_fits_is_a_one_line_error(tiny_ckpt, own_cache, capsys, rows, budget, needle):
    write_table(cli_key(tiny_ckpt), table(*rows))
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--prompt", "hi",
                 "--power-budget", budget]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("edge-dlm: error:")


def test_budget_flag_picks_within_watts(tiny_ckpt, own_cache, capsys):
    write_table(cli_key(tiny_ckpt), SPEEDS)
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--prompt", "hi", "--json",
                 "--max-new-tokens", "4", "--power-budget", "10"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["mode"] == "ar" and "within 10 W" in out.err


def test_bad_flags_fail_before_calibrating(tiny_ckpt, own_cache, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--prompt", "hi",
                 "--threshold", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threshold" in err[0]
    assert not list(own_cache.rglob("*.json"))  # nothing was measured


@pytest.mark.slow
def test_auto_builds_the_onnx_engine_once_and_uses_it(tiny_ckpt, own_cache, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    d = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    argv = ["generate", "--model", str(d), "--device", "cpu", "--prompt", "hello", "--json", "--max-new-tokens", "6"]
    assert main(argv) == 0  # not measured yet: the default at once, no calibration, and how to measure
    err = capsys.readouterr().err
    assert "auto: ar on torch (the default: this machine is not measured yet" in err and "calibrating" not in err
    assert main(["calibrate", "--model", str(d), "--device", "cpu"]) == 0
    capsys.readouterr()
    key = cli_key(d)
    measured = cal.load_table(key)
    assert {r.engine for r in measured.rows} == {"torch", "onnxruntime"}
    engine = cal.artifact_dir(key)
    assert (engine / "model.onnx").exists() and (engine / "manifest.json").exists()
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before  # the user's checkpoint is untouched
    # the table says onnxruntime AR is fastest: auto loads the cached engine, no rebuild, same tokens
    rows = [r for r in measured.rows if (r.mode, r.engine) not in (("ar", "onnxruntime"), ("linear-spec", "torch"))]
    write_table(key, cal.Table(key, rows + [cal.Row("onnxruntime", "ar", None, 1e6, 1.0),
                                            cal.Row("torch", "linear-spec", None, 1e6, 1.0)], measured.meta))
    built = (engine / "model.onnx").stat().st_mtime_ns
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "auto: ar on onnxruntime" in out.err and "calibrating" not in out.err
    assert (engine / "model.onnx").stat().st_mtime_ns == built
    want = edge_dlm.load(d, device="cpu", engine="torch").generate("hello", mode="ar", max_new_tokens=6)
    assert json.loads(out.out)["output_ids"] == want.output_ids
    # one engine rule for every mode: an explicit --mode ar runs where the table says AR is fastest ...
    assert main([*argv, "--mode", "ar"]) == 0
    out = capsys.readouterr()
    assert "engine: onnxruntime (measured faster for ar here" in out.err
    assert json.loads(out.out)["output_ids"] == want.output_ids
    # ... and a mode measured faster on torch runs on torch; --engine says otherwise when asked
    assert main([*argv, "--mode", "linear-spec"]) == 0 and "engine:" not in capsys.readouterr().err
    assert main([*argv, "--mode", "ar", "--engine", "torch"]) == 0 and "engine:" not in capsys.readouterr().err
    assert main([*argv, "--mode", "ar", "--engine", "onnxruntime"]) == 0  # the engine auto built, by name
    assert json.loads(capsys.readouterr().out)["output_ids"] == want.output_ids
    # the cache lost the engine: auto measures again and rebuilds it
    shutil.rmtree(engine)
    assert main(argv) == 0
    assert "calibrating" in capsys.readouterr().err and (engine / "model.onnx").exists()


def test_calibrate_command_and_doctor_print_the_table(tiny_ckpt, own_cache, capsys):
    assert main(["calibrate", "--model", str(tiny_ckpt), "--device", "cpu", "--engine", "torch", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in measured["rows"]][:3] == ["ar", "linear-spec", "quadratic-spec"]
    assert measured["compiled_passes"]["compiled_tokens_per_s"] > 0  # compiled ahead and measured
    assert "onnxruntime" in measured["meta"]["not_measured"]
    from edge_dlm.primitives.machine import measured_threads, usable_cpus

    if usable_cpus() > 1:  # the threads count measured idle and beside a busy core, and kept
        chosen = measured["threads"]
        assert all(len(v) == 2 and min(v) > 0 for v in chosen["tokens_per_s"].values())
        assert measured_threads()["threads"] == chosen["threads"]
    write_table(cli_key(tiny_ckpt, device="auto"), SPEEDS)  # doctor reads the default options' table
    assert main(["doctor", "--model", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "diffusion S=1" in out and "auto: linear-spec on torch" in out and "energy meter:" in out
    assert usable_cpus() == 1 or "measured by `edge-dlm calibrate`" in out


# ---- the server -----------------------------------------------------------------------------------

def test_server_reports_joules_and_runs_auto_requests(tiny_ckpt, monkeypatch):
    from edge_dlm.primitives import power
    from edge_dlm.server.app import ServeOptions, build_server

    monkeypatch.setattr(power, "EnergyMeter", lambda device, powercap=None: FakeMeter(50.0))
    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    server = build_server(rt, "127.0.0.1", 0, ServeOptions(default_mode="diffusion", default_steps=2))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def post(body):
            req = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/v1/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())

        out = post({"prompt": "hello", "max_tokens": 6, "mode": "auto"})
        want = rt.generate("hello", raw=True, mode="diffusion", steps=2, max_new_tokens=6)
        assert out["choices"][0]["text"] == want.text and out["usage"]["nfe"] == want.nfe
        assert out["usage"]["joules"] > 0
        ar = post({"prompt": "hello", "max_tokens": 6, "mode": "ar"})
        assert ar["choices"][0]["text"] == rt.generate("hello", raw=True, mode="ar", max_new_tokens=6).text
        assert ar["usage"]["joules"] > 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("damage", [b"[1, 2]", b'{"format": %d, "key": "%s", "rows": "x"}', b"\x00junk", b"", "dir"])
def test_a_damaged_calibration_table_is_set_aside(tmp_path, monkeypatch, capfd, damage):
    """A table cut short, junk, valid JSON of the wrong shape or a folder in its place: set aside with
    one line, then measured again (None here), never a traceback."""
    from edge_dlm.session import calibrate

    monkeypatch.setattr(calibrate, "cache_file", lambda key: tmp_path / f"{key}.json")
    path = tmp_path / "k.json"
    if damage == "dir":
        path.mkdir()
    else:
        if b"%d" in damage:
            damage = damage % (calibrate.FORMAT, b"k")
        path.write_bytes(damage)
    assert calibrate.load_table("k") is None
    err = capfd.readouterr().err
    assert err.count("set aside the damaged file") == 1 and not path.exists()
