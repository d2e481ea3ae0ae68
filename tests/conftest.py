"""Shared fixtures: tiny random NLD checkpoints in the real format."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_dlm.testing import write_tiny_checkpoint
from edge_dlm.weights import load_model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """2 layers, GQA 2, block 4, YaRN active past 16 positions, with a LoRA drafter."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", original_max=16, lora=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    return load_model(tiny_ckpt)
