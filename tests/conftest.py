"""Shared test fixtures: where the real data lives, and one in-process Ray for the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run in the interpreter on a machine without a GPU. The switch is read when triton is first imported
# (torch's optimizers import it), so it is set for the whole run before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real test data not found at {DATA}: the tests expect ../shared beside the repository")
    return DATA


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray, started once and shared by the tests that need it (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    return ray
