"""`edge-dlm chat` in a real terminal: tmux starts it, types a prompt, and the answer appears."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "edge-dlm").exists(), reason="needs the .venv CLI")
def test_chat_in_tmux(tiny_ckpt):
    proc = subprocess.run([str(ROOT / "scripts" / "tmux_chat_check.sh"), str(tiny_ckpt)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tmux chat check: ok" in proc.stdout
