"""InfLLM v2 trainable sparse attention (MiniCPM4): block selection and block-sparse attention.

`infllmv2_attention` always attends sparsely; the caller (model/attention.py) decides dense vs sparse with
`dense_len`, so the same weights serve both modes. Backends: "triton" (the kernels in selection.py and
sparse_attention.py, run on CUDA or under TRITON_INTERPRET=1), "torch" (reference.py, the CPU path), and
"auto", which picks Triton on CUDA or when TRITON_INTERPRET=1 and the reference otherwise.
The selection follows the released kernels (reference.py spells the rules out); padded batches are unpadded
into one varlen batch, as the released code does. targets.py compiles every kernel for sm_80 and sm_90.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .config import SparseConfig
from .layout import VarlenLayout
from .reference import select_blocks_full_ref, sparse_attention_ref

__all__ = ["SparseConfig", "infllmv2_attention", "infllmv2_attention_varlen", "select_blocks_varlen"]

BACKENDS = ("auto", "triton", "torch")


def _uses_triton(backend: str, device: torch.device) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return backend == "triton"


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"expected packed q [Nq, Hq, D] and k, v [Nk, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}), same head dim")


def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, sparse_config: SparseConfig | dict[str, Any], *,
                         backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Selected key blocks [Hkv, Nq, budget] int32 (forced blocks first, then by score; -1 padded)."""
    cfg = SparseConfig.from_dict(sparse_config)
    _check_shapes(q, k, k)
    if _uses_triton(backend, q.device):
        from .selection import select_blocks

        return select_blocks(q.detach(), k.detach(), VarlenLayout(cu_seqlens_q, cu_seqlens_k, cfg.block_size),
                             cfg, scale)
    return select_blocks_full_ref(q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, cfg, scale)


def infllmv2_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, sparse_config: SparseConfig | dict[str, Any],
                              *, backend: str = "auto", scale: float | None = None,
                              block_m: int = 64) -> torch.Tensor:
    """Packed q [Nq, Hq, D], k/v [Nk, Hkv, D] with cu_seqlens (int32, one more than sequences) -> [Nq, Hq, D].

    Each sequence's queries are the last Tq of its Tk keys (prefill: Tq == Tk, decode: Tq == 1).
    Differentiable w.r.t. q, k, v; the selection is not differentiated.
    """
    cfg = SparseConfig.from_dict(sparse_config)
    _check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if _uses_triton(backend, q.device):
        from .selection import select_blocks
        from .sparse_attention import sparse_attention

        layout = VarlenLayout(cu_seqlens_q, cu_seqlens_k, cfg.block_size)
        block_idx = select_blocks(q.detach(), k.detach(), layout, cfg, scale)
        return sparse_attention(q, k, v, block_idx, layout, cfg.block_size, scale, block_m=block_m)
    block_idx = select_blocks_full_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg, scale)
    return sparse_attention_ref(q, k, v, block_idx, cu_seqlens_q, cu_seqlens_k, cfg.block_size, scale)


def infllmv2_attention(q, k, v, sparse_config: SparseConfig | dict[str, Any], *, backend: str = "auto",
                       scale: float | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], queries = the last Tq of the Tk keys (causal) -> [B, Hq, Tq, D].

    attention_mask [B, Tk] (1 = real token), as the released code does it: the real tokens of each row are
    packed into one varlen batch (cu_seqlens from the mask), so positions, blocks and selection are those of
    the unpadded sequence, and the output is scattered back; padded query rows come out as zeros.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2] > k.shape[2]:
        raise ValueError(f"expected q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] with Tq <= Tk; got {q.shape}, {k.shape}")
    batch, hq, tq, d = q.shape
    tk = k.shape[2]
    if attention_mask is None:
        def packed(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(-1, x.shape[1], d)

        steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        out = infllmv2_attention_varlen(packed(q), packed(k), packed(v), steps * tq, steps * tk, sparse_config,
                                        backend=backend, scale=scale)
        return out.view(batch, tq, hq, d).transpose(1, 2)
    if attention_mask.shape != (batch, tk):
        raise ValueError(f"attention_mask must be [B, Tk] = {[batch, tk]}, got {list(attention_mask.shape)}")
    real_keys = attention_mask.bool()
    # A row's real queries are its real keys among the last Tq positions, i.e. the last of its real keys.
    real_queries = real_keys[:, tk - tq :]
    rows = real_queries.any(1)  # a row with no real query takes no part
    real_keys, real_queries = real_keys & rows[:, None], real_queries & rows[:, None]

    def cu_seqlens(real: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(real[rows].sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

    out = torch.zeros(batch, tq, hq, d, dtype=q.dtype, device=q.device)
    if rows.any():
        out[real_queries] = infllmv2_attention_varlen(
            q.transpose(1, 2)[real_queries], k.transpose(1, 2)[real_keys], v.transpose(1, 2)[real_keys],
            cu_seqlens(real_queries), cu_seqlens(real_keys), sparse_config, backend=backend, scale=scale,
        )
    return out.transpose(1, 2)
