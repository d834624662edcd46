"""Triton helpers shared by the InfLLM v2 kernels."""

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


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
