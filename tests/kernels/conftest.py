"""Kernel tests run on the GPU when there is one, else under Triton's CPU interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before the kernel
modules are imported, hence here at conftest import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the kernels need triton (make test installs it)")

