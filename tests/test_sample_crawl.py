"""The embedded data and its generators cannot drift apart: regenerating gives the shipped files byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipelines" / "sample_data"


@pytest.mark.parametrize("tool, shipped", [
    ("make_sample_crawl.py", SAMPLE),
    ("make_seed_pools.py", SAMPLE / "seeds"),
])
def test_regenerated_embedded_data_is_byte_identical(tool, shipped, tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / tool), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made and all((shipped / name).read_bytes() == (tmp_path / name).read_bytes() for name in made)
