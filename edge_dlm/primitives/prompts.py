"""The bundled prompts (`prompts.json`): code completions and chat questions that calibration,
AWQ and the benchmark run on. Core data, so every layer may read it."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
KINDS = ("code", "prose")


def bundled(kind: str) -> list[str]:
    """The bundled prompts of one kind: "code" (raw completions) or "prose" (chat questions)."""
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))[kind]
