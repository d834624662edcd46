"""The floors of the house, checked on the source: imports only run downward.

jobs (pipelines) -> stages, verification, sft_synth -> model, kernels -> core. Ray belongs to the jobs: stages
never know the executor (as datatrove's steps never import theirs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"core", "pipelines", "stages", "verification", "sft_synth", "model", "kernels"}
# what each package may import of ours
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "model": {"core", "kernels"},
    "stages": {"core", "model"},
    "verification": {"core", "model", "kernels"},
    "sft_synth": {"core", "model", "kernels", "stages"},
    "pipelines": OURS,
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level module names imported by each file of a package, absolute imports and inside functions too."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_downward(package):
    upward = {file: sorted((names & OURS) - ALLOWED[package] - {package})
              for file, names in imports_of(package).items()}
    assert {file: names for file, names in upward.items() if names} == {}


@pytest.mark.parametrize("package", ["core", "stages", "verification", "sft_synth", "model", "kernels"])
def test_only_jobs_and_the_ground_floor_runtime_know_ray(package):
    users = {file for file, names in imports_of(package).items() if "ray" in names}
    assert users <= {"core/runtime.py"}
