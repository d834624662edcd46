"""InfLLM v2 sparse-attention settings: the `sparse_config` of a MiniCPM4 `config.json`, field for field.

The eight released keys (block_size, dense_len, init_blocks, kernel_size, kernel_stride, topk, use_nope,
window_size) mean what the released code makes of them; two more fields, with the released behaviour as their
defaults, choose the stage-1 normaliser:
- `normaliser="coarse"` (released): each query head's softmax over the compressed keys takes its log-sum-exp
  from coarser keys (kernel and stride `coarse_factor` times larger: 128 and 64), and the group-summed scores
  are stored in bfloat16. `normaliser="exact"`: the exact softmax over the compressed keys, scores in float32.
- `coarse_factor=4`: how much coarser the normaliser's keys are (the released code hard-codes 4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

NORMALISERS = ("coarse", "exact")


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
    normaliser: str = "coarse"
    coarse_factor: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size", "kernel_size", "kernel_stride", "topk", "window_size", "coarse_factor"):
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
        # A kernel longer than a block could leave a whole past block without a visible kernel.
        if self.kernel_size > self.block_size:
            raise ValueError(f"kernel_size ({self.kernel_size}) must be <= block_size ({self.block_size})")
        # The budget is topk + local_blocks ids and at most init_blocks + local_blocks + 1 of them are forced.
        if self.topk < self.init_blocks + 1:
            raise ValueError(
                f"topk ({self.topk}) must be at least init_blocks + 1 ({self.init_blocks + 1}) so that the "
                "forced blocks (init blocks, local blocks) always fit in the budget"
            )
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"sparse_config.normaliser must be one of {NORMALISERS}, got {self.normaliser!r}")
        if self.use_nope:
            raise ValueError("use_nope=True (selection on un-rotated keys) is not implemented")

    @property
    def local_blocks(self) -> int:
        """Blocks before the query's own that are forced in: qb - local_blocks .. qb (33 blocks released)."""
        return self.window_size // self.block_size

    @property
    def budget(self) -> int:
        """Block ids selected per query, forced ones included: topk + window_size // block_size (96)."""
        return self.topk + self.local_blocks

    @property
    def pool_kernels(self) -> int:
        """Number of compressed keys (kernels) that overlap one block (5 released: kernels 4b-1 .. 4b+3)."""
        return (self.block_size + self.kernel_size) // self.kernel_stride - 1

    @property
    def coarse_kernel_size(self) -> int:
        return self.coarse_factor * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return self.coarse_factor * self.kernel_stride

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
