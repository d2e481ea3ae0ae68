"""Compiled step functions kept across processes (`StepFunctions.store`): a new process loads what an
earlier one compiled, never re-traces, answers the eager tokens, and a damaged or foreign file in the
store is set aside (one line) and the answer is still the eager one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_dlm.model import compiled
from edge_dlm.model import store as stores

pytestmark = pytest.mark.skipif(bool(compiled.available("cpu")), reason="no C++ compiler for inductor")

PROMPT = "Write a story about a lighthouse"
TOKENS = 40

# a new process: the demo model with --compile on, one AR request; what it loaded and whether dynamo
# traced anything (its frame counter counts every frame it compiled)
CHILD = f"""
import json, torch, torch._dynamo.utils
from edge_dlm.runtime import load
rt = load(device="cpu", compile="on", threads=1)
r = rt.generate({PROMPT!r}, mode="ar", max_new_tokens={TOKENS}, ignore_eos=True)
step = rt.model.step
print(json.dumps({{"ids": r.output_ids, "loaded": step.loaded, "compiled": len(step.fns),
                  "traced": sum(torch._dynamo.utils.counters["frames"].values())}}))
"""


def child(cache: Path) -> tuple[dict, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache whose store holds the AR step functions of one request (compiled by an earlier process
    in the background, as a server or a chat compiles between requests), and the eager tokens."""
    cache = tmp_path_factory.mktemp("xdg")
    code = f"""
from edge_dlm.model.store import compiled_store
from edge_dlm.runtime import load
rt = load(device="cpu", compile="on", threads=1)
rt.generate({PROMPT!r}, mode="ar", max_new_tokens={TOKENS}, ignore_eos=True)
rt.model.step.wait()
print(compiled_store(rt))
eager = load(device="cpu", compile="off", threads=1)
print(eager.generate({PROMPT!r}, mode="ar", max_new_tokens={TOKENS}, ignore_eos=True).output_ids)
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    store, ids = out.stdout.strip().splitlines()[-2:]
    files = sorted(Path(store).glob("*.step"))
    assert len(files) >= 2, out.stderr[-2000:]  # a prefill width and the decode step at least
    return cache, Path(store), json.loads(ids)


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_new_process_loads_and_never_traces(warm):
    cache, store, ids = warm
    got, err = child(cache)
    assert got["ids"] == ids  # the eager tokens
    assert got["loaded"] == got["compiled"] == len(list(store.glob("*.step")))
    assert got["traced"] == 0, err[-2000:]  # nothing re-traced: every pass shape came from the store


def test_a_damaged_file_is_set_aside(warm, tmp_path):
    cache, store, ids = warm
    mine = copy_cache(cache, tmp_path / "xdg")
    victim = sorted((mine / store.relative_to(cache)).glob("*.step"))[0]
    victim.write_bytes(b"\x80\x04not a compiled function")
    got, err = child(mine)
    assert got["ids"] == ids
    assert "set aside the damaged file" in err and victim.with_name(victim.name + ".bad").exists()
    assert got["loaded"] == len(list(store.glob("*.step"))) - 1


def test_a_foreign_function_fails_its_guards(warm, tmp_path):
    """A stored function under another key's name (a hash collision, a hand-copied file) is caught by
    its guards on first use, not run."""
    cache, store, ids = warm
    mine = copy_cache(cache, tmp_path / "xdg")
    a, b = sorted((mine / store.relative_to(cache)).glob("*.step"))[:2]
    b.write_bytes(a.read_bytes())
    got, err = child(mine)
    assert got["ids"] == ids
    assert "guards do not hold" in err and b.with_name(b.name + ".bad").exists()


def test_the_store_is_per_code_version_and_machine(warm):
    """The store's folder names the model key (weights, precision, machine, torch) and edge-dlm's code."""
    from edge_dlm.model.store import compiled_key, compiled_store
    from edge_dlm.runtime import load

    cache, store, _ = warm
    assert store.name.endswith(stores.code_version())
    rt = load(device="cpu", compile="off")
    assert compiled_store(rt).name == f"{compiled_key(rt)}-{stores.code_version()}"


def test_auto_for_one_shot_weighs_the_start(tmp_path):
    """`--compile auto` for a one-shot command compiles only where the tokens it decodes save more than
    a compiled process's start-up costs (both measured by `edge-dlm calibrate`)."""
    stores.record(tmp_path, "k", eager=100.0, compiled=200.0, start_s=1.0)  # 5 ms saved a token
    assert stores.measured_faster(tmp_path, "k")  # a server, a chat: faster is enough
    assert not stores.measured_faster(tmp_path, "k", tokens=150)  # 0.75 s saved < 1 s
    assert stores.measured_faster(tmp_path, "k", tokens=250)  # 1.25 s saved > 1 s
    stores.record(tmp_path, "old", eager=100.0, compiled=200.0)  # no start measured: eager one-shots
    assert stores.measured_faster(tmp_path, "old") and not stores.measured_faster(tmp_path, "old", tokens=10**6)
    stores.record(tmp_path, "slow", eager=200.0, compiled=100.0, start_s=0.0)
    assert not stores.measured_faster(tmp_path, "slow", tokens=10**6)


def test_an_upgrade_drops_the_old_versions_store(tmp_path):
    from edge_dlm.model.store import drop_old_stores

    steps = tmp_path / "steps"
    mine, old, other = steps / "abc-v2", steps / "abc-v1", steps / "xyz-v1"
    for d in (mine, old, other):
        d.mkdir(parents=True)
        (d / "f.step").write_bytes(b"x")
    drop_old_stores(mine)
    assert mine.is_dir() and other.is_dir() and not old.exists()


def test_a_file_too_large_to_be_a_step_function_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "x--.step"
    path.write_bytes(b"\0" * 64)
    monkeypatch.setattr(stores, "MAX_STEP_BYTES", 16)
    with pytest.raises(ValueError, match="more than a compiled step function"):
        stores.read_stored(path)


def test_a_failed_start_measurement_is_one_line_and_no_number(tmp_path, capsys):
    junk = tmp_path / "junk--.step"
    junk.write_bytes(b"not a function")
    assert stores.measure_start([junk]) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keeps one-shot commands eager" in err
