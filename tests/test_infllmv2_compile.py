"""Every InfLLM v2 kernel compiles for A100 (sm_80) and H100 (sm_90) at MiniCPM4 shapes, on a machine without a GPU.

The tests run the kernels in the interpreter (TRITON_INTERPRET=1), where @triton.jit gives no compilable
function, so the compile proof (kernels/infllmv2/targets.py) runs once in a subprocess without it; Triton's
cache keeps the artefacts between runs. Every autotune configuration that the shared-memory estimate keeps for
a target is compiled to PTX and a cubin with the ptxas shipped in the triton wheel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"compress_keys", "log_normaliser", "select", "select_exact", "sparse_fwd", "sparse_bwd_dq",
           "sparse_bwd_dkdv"}
LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # CUDA C++ Programming Guide: max shared memory per block


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    run = subprocess.run([sys.executable, "-m", "kernels.infllmv2.targets", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    if run.returncode != 0:
        pytest.fail(f"a kernel failed to compile:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    built = {(row["kernel"], row["target"]) for row in compiled}
    assert built == {(kernel, target) for kernel in KERNELS for target in LIMITS}


def test_every_kept_configuration_fits_the_targets_shared_memory(compiled):
    for row in compiled:
        assert row["shared_limit"] == LIMITS[row["target"]]
        assert 0 <= row["shared_bytes"] <= row["shared_limit"], row
        assert row["fits"]


def test_shared_memory_estimate_never_undercounts_the_compiler(compiled):
    """The autotuner prunes with the estimate: below the real figure it could keep a launch that fails."""
    for row in compiled:
        assert row["shared_estimate"] >= row["shared_bytes"], row


def test_resource_usage_is_read_from_the_cubin(compiled):
    for row in compiled:
        assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0, row
