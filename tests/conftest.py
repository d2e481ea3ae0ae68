"""Shared fixtures: tiny random NLD checkpoints in the real format."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_dlm.model.testing import write_tiny_checkpoint
from edge_dlm.model.weights import load_model


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Calibration tables, auto-built engines and runtime caches go to a temporary cache dir, never the
    user's (subprocesses inherit it)."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """2 layers, GQA 2, block 4, YaRN active past 16 positions, with a LoRA drafter."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", original_max=16, lora=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    return load_model(tiny_ckpt)
