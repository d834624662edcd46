"""Triton pieces shared by the InfLLM v2 kernels: the tile prologue, tl.dot on the interpreter, autotuning.

Every kernel works on a packed (varlen) batch and starts the same way: find its sequence's offsets, its query
rows and their positions, and load row tiles of one head. Those steps are the helpers below.

Autotuning follows Triton's fused-attention tutorial: a short list of configurations per kernel (warps,
stages, tile sizes) pruned before timing to those whose shared memory fits the device. The estimate is a
per-kernel function of the launch's constexprs; the compile proof (targets.py) checks it against what the
compiler allocates for sm_80 and sm_90. Under TRITON_INTERPRET=1 there is nothing to time, so the first
configuration runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Shared memory a thread block may use (the opt-in maximum), per compute capability major*10 + minor, in
# bytes: A100 (8.0) 163 KB, H100 (9.0) 227 KB. Source: CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability" (maximum shared memory per thread block); the driver reports the same figure as
# CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, which the autotuner reads on a live GPU.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@triton.jit
def mma(a, b):
    """tl.dot with float32 accumulation.

    The CPU interpreter of triton 3.x multiplies bf16 tiles as their raw uint16 bits, so there the operands
    are widened first; a bf16 x bf16 product is exact in float32, so the result is what the GPU computes.
    """
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32: what the GPU's cast does.

    Done on the bits because the interpreter's float32 -> bfloat16 cast truncates instead. Sign and magnitude
    are separate bits, so adding to the low half rounds the magnitude of negative values alike.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def sequence_bounds(cu_seqlens_q, cu_seqlens_k, seq):
    """(q_start, seqlen_q, k_start, seqlen_k) of packed sequence `seq`."""
    q_start = tl.load(cu_seqlens_q + seq)
    k_start = tl.load(cu_seqlens_k + seq)
    return q_start, tl.load(cu_seqlens_q + seq + 1) - q_start, k_start, tl.load(cu_seqlens_k + seq + 1) - k_start


@triton.jit
def query_tile(tile_start, tile, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr):
    """(rows, row_ok, pos): a tile's query rows in its sequence, which are real, and their key positions."""
    rows = tl.load(tile_start + tile) + tl.arange(0, BLOCK_M)
    return rows, rows < seqlen_q, seqlen_k - seqlen_q + rows


@triton.jit
def load_tile(ptr, offsets, row_ok, D: tl.constexpr):
    """[len(offsets), D] rows starting at ptr + offsets; zeros where not row_ok."""
    d = tl.arange(0, D)
    return tl.load(ptr + offsets[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def store_tile(ptr, offsets, row_ok, value, D: tl.constexpr):
    d = tl.arange(0, D)
    tl.store(ptr + offsets[:, None] + d[None, :], value.to(ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def load_rows(ptr, first, rows, row_ok, head, stride_n, stride_h, D: tl.constexpr):
    """[len(rows), D] tile of one head at packed rows first + rows; zeros where not row_ok."""
    return load_tile(ptr, (first + rows).to(tl.int64) * stride_n + head * stride_h, row_ok, D)


def configs(space: list[dict[str, Any]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list[triton.Config]:
    """Every (tile sizes, num_warps, num_stages) combination, the interpreter's choice first."""
    return [triton.Config(dict(tiles), num_warps=w, num_stages=s) for tiles in space for w in warps for s in stages]


def fitting_configs(candidates: list[triton.Config], shared_estimate: Callable[[dict[str, Any]], int],
                    launch: dict[str, Any], limit: int) -> list[triton.Config]:
    """The configurations whose estimated shared memory for this launch is within `limit` bytes."""
    return [c for c in candidates
            if shared_estimate({**launch, **c.kwargs, "num_stages": c.num_stages, "num_warps": c.num_warps}) <= limit]


def device_shared_memory_limit() -> int:
    device = triton.runtime.driver.active.get_current_device()
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def autotune(candidates: list[triton.Config], key: list[str], shared_estimate: Callable[[dict[str, Any]], int]):
    """triton.autotune over `candidates`, keeping those whose shared memory fits the current device."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        if INTERPRETED:
            return configs[:1]
        launch = {**named_args, **kwargs}
        kept = fitting_configs(configs, shared_estimate, launch, device_shared_memory_limit())
        if not kept:
            raise RuntimeError(f"no configuration fits this device's shared memory for {sorted(kwargs.items())}")
        return kept

    def decorate(fn):
        tuner = triton.autotune(configs=candidates, key=key, prune_configs_by={"early_config_prune": prune})(fn)
        tuner.shared_estimate = shared_estimate  # for the compile proof (targets.py)
        return tuner

    return decorate
