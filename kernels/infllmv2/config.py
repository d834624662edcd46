"""InfLLM v2 sparse-attention settings, field for field the `sparse_config` of a MiniCPM4 `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SparseConfig:
    block_size: int = 64
    dense_len: int = 8192
    init_blocks: int = 1
    kernel_size: int = 32
    kernel_stride: int = 16
    topk: int = 64
    use_nope: bool = False
    window_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("block_size", "kernel_size", "kernel_stride", "topk", "window_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sparse_config.{name} must be >= 1, got {getattr(self, name)}")
        if self.init_blocks < 0 or self.dense_len < 0:
            raise ValueError("sparse_config.init_blocks and dense_len must be >= 0")
        # Block scores are max-pooled from whole kernels, so kernels must tile blocks exactly.
        if self.block_size % self.kernel_stride or self.kernel_size % self.kernel_stride:
            raise ValueError(
                f"block_size ({self.block_size}) and kernel_size ({self.kernel_size}) must be multiples "
                f"of kernel_stride ({self.kernel_stride})"
            )
        # A kernel longer than a block could leave a whole past block without a visible kernel, and then
        # top-k covering every block would no longer equal dense attention.
        if self.kernel_size > self.block_size:
            raise ValueError(f"kernel_size ({self.kernel_size}) must be <= block_size ({self.block_size})")
        if self.topk < self.forced_blocks:
            raise ValueError(
                f"topk ({self.topk}) must be at least init_blocks + local window blocks "
                f"({self.forced_blocks}) so that the forced blocks always fit"
            )
        if self.use_nope:
            raise ValueError("use_nope=True (selection on un-rotated keys) is not implemented")

    @property
    def forced_blocks(self) -> int:
        """Most blocks a query can be forced to take: the initial ones plus those its window overlaps."""
        return self.init_blocks + -(-self.window_size // self.block_size) + 1

    @property
    def pool_kernels(self) -> int:
        """Number of compressed keys (kernels) that overlap one block."""
        return (self.block_size + self.kernel_size) // self.kernel_stride - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SparseConfig) -> SparseConfig:
        if isinstance(d, SparseConfig):
            return d
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sparse_config key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
