"""The CPU threads passes use: --threads, else $EDGE_DLM_THREADS, else what `edge-dlm calibrate` measured
on this machine, else half the CPUs; a bad or foreign record is ignored, never an error."""

from __future__ import annotations

import json

import pytest

from edge_dlm.primitives import machine
from edge_dlm.primitives.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("EDGE_DLM_THREADS", raising=False)
    monkeypatch.setattr(machine, "usable_cpus", lambda: 8)
    return tmp_path / "edge-dlm" / "threads.json"


def test_precedence(cache, monkeypatch):
    assert machine.threads_for(None) == 4  # half the CPUs: nothing measured
    machine.record_threads(3, {1: [100.0, 90.0], 3: [250.0, 200.0], 4: [260.0, 40.0]})
    assert machine.measured_threads()["threads"] == 3
    assert machine.threads_for(None) == 3  # measured here
    monkeypatch.setenv("EDGE_DLM_THREADS", "2")
    assert machine.threads_for(None) == 2  # the environment over the measurement
    assert machine.threads_for(5) == 5  # --threads over everything
    monkeypatch.setenv("EDGE_DLM_THREADS", "two")
    with pytest.raises(UserError):
        machine.threads_for(None)


@pytest.mark.parametrize("text", ["not json", "[]", '{"x": 1}', None])
def test_bad_or_foreign_records_are_ignored(cache, text):
    cache.parent.mkdir(parents=True)
    if text is None:  # a record of another machine (other CPU, other CPU set), or a count this one lacks
        text = json.dumps({"Another CPU, 8 usable CPUs": {"threads": 2, "tokens_per_s": {}},
                           machine._cpu_key(): {"threads": 64, "tokens_per_s": {}}})
    cache.write_text(text)
    assert machine.measured_threads() is None and machine.threads_for(None) == 4
    machine.record_threads(2, {2: [1.0, 1.0]})  # recording over a bad file replaces it
    assert machine.threads_for(None) == 2
